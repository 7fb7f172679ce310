//! Compiles `proto/*.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["../../proto/storage.proto", "../../proto/coordinator.proto"];
    let fds = protox::compile(files, ["../../proto"])?;
    // `bytes` fields as `bytes::Bytes`: decoded as slices of the received
    // buffer, cloned by reference count.
    // The error form is geolog-core's (compiled there from error.proto).
    tonic_prost_build::configure()
        .bytes(".")
        .extern_path(".geolog.error.v1", "::geolog_core::error::wire")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
