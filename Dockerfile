# The one Synod image: both binaries, so an operator always creates brokers of
# its own version. Build: docker build -t synod:<version> .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p synod-broker -p synod-operator \
    && strip target/release/synod-broker target/release/synod-operator

# distroless/cc has glibc and libgcc only; "nonroot" runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/synod-broker /usr/local/bin/synod-broker
COPY --from=build /src/target/release/synod-operator /usr/local/bin/synod-operator
USER 65532:65532
WORKDIR /var/lib/synod
ENV SYNOD_DATA_DIR=/var/lib/synod
EXPOSE 5672 5671 15672 15692 25672
ENTRYPOINT ["/usr/local/bin/synod-broker"]
