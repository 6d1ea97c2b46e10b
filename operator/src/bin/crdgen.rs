//! Writes the CRD YAML of every custom resource into a directory (default `crds/`).

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "crds".to_string());
    std::fs::create_dir_all(&dir)?;
    for (stem, crd) in synod_operator::crd::all() {
        let path = std::path::Path::new(&dir).join(format!("{stem}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&crd)?)?;
    }
    Ok(())
}
