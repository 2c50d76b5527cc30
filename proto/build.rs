//! Generates the gRPC code from `proto/` with a protoc that comes from crates.io
//! (`protoc-bin-vendored`), so a build needs nothing but cargo. Writes only to OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let include = protoc_bin_vendored::include_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/csi/v1/csi.proto", "proto/modelcache/v1/agent.proto"],
        &[
            "proto",
            include.to_str().ok_or("protoc include path is not UTF-8")?,
        ],
    )?;
    Ok(())
}
