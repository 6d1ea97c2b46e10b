//! The `synod-operator` binary: flags, logging, then the library's controllers.

fn main() {
    println!("synod-operator: controllers are not built yet");
}
