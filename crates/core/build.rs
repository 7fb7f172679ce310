//! Compiles `proto/error.proto` (the error form that crosses services) with
//! protox, so no system `protoc` is needed. geolog-proto embeds these types
//! from here instead of generating its own.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["../../proto/error.proto"], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=../../proto/error.proto");
    Ok(())
}
