//! The committed OpenAPI document must match the one generated from the code.

#[test]
fn committed_openapi_matches_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi/kumo.json");
    let generated = kumo_api::openapi_json();
    if std::env::var_os("KUMO_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, format!("{generated}\n")).expect("write openapi");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed.trim_end() == generated.trim_end(),
        "openapi/kumo.json is out of date with the code; run `KUMO_BLESS=1 cargo test -p kumo --test all openapi` and commit it"
    );
}
