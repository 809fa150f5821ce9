//! The catalogue over the API: service versions, base uploads, the app store; every bad
//! input answered with a clear error that leaves the catalogue as it was.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use agent::client::{Client, RawResponse};
use agent::http::{ServiceView, VersionView};
use agent::store::{sha256_file, AppRecord, BaseInfo};

use crate::common::{images, operator_token, verify_guest, AgentProc, Scratch};

fn says(r: &RawResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert!(r.body.contains(needle), "{needle:?} not in {r:?}");
}

/// Everything the catalogue shows, to compare before and after a refused change.
fn catalogue(c: &Client) -> String {
    let mut out = String::new();
    for p in ["/v1/services", "/v1/bases", "/v1/apps"] {
        out.push_str(&c.raw("GET", p, None, true).unwrap().body);
    }
    for s in c.services().unwrap() {
        let p = format!("/v1/services/{}/versions", s.name);
        out.push_str(&c.raw("GET", &p, None, true).unwrap().body);
    }
    for a in c.get_json::<Vec<AppRecord>>("/v1/apps").unwrap() {
        let p = format!("/v1/apps/{}/versions", a.name);
        out.push_str(&c.raw("GET", &p, None, true).unwrap().body);
    }
    out
}

fn put(c: &Client, path: &str, body: &[u8]) -> RawResponse {
    c.raw("PUT", path, Some(body), true).unwrap()
}

/// A request whose Content-Length says more than the board takes: 413 before any byte of
/// the body is read.
fn oversized(a: &AgentProc, path: &str) -> String {
    let mut s = TcpStream::connect(a.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        operator_token(),
        1u64 << 40
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn service_versions_and_the_refusal_to_delete_what_runs() {
    let a = AgentProc::start("versions", &[]);
    let c = a.client();
    let one = c.services().unwrap().remove(0);
    assert_eq!((one.name.as_str(), one.version), ("model", 1));

    // An upload of an overlay to an existing service is its next version, made current.
    let s: ServiceView = c
        .upload(
            "/v1/services/model/overlay",
            &images().overlay,
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(s.version, 2);
    assert_eq!(s.description, "1 MiB model", "the description stays");
    let vs: Vec<VersionView> = c.get_json("/v1/services/model/versions").unwrap();
    let (sha, bytes) = sha256_file(&images().overlay).unwrap();
    assert_eq!(vs.len(), 2);
    for (v, n) in vs.iter().zip([1, 2]) {
        assert_eq!(v.record.version, n);
        assert_eq!(v.record.overlay_sha256, sha);
        assert_eq!(v.record.overlay_bytes, bytes);
        assert_eq!(v.current, n == 2);
    }

    // An instance of version 2 runs: the service and that version cannot be deleted.
    let i = c.start("model").unwrap();
    verify_guest(&i.endpoint);
    assert_eq!(c.instance(&i.id).unwrap().version, Some(2));
    let before = catalogue(&c);
    let r = c.raw("DELETE", "/v1/services/model", None, true).unwrap();
    says(&r, 409, "cannot be deleted while 1 instance(s) of it run");
    says(&r, 409, &i.id);
    says(
        &c.raw("DELETE", "/v1/services/model/versions/2", None, true)
            .unwrap(),
        409,
        "instance(s) of it run",
    );
    // Roll back to version 1; version 2 still runs, so it stays.
    let r = c
        .raw(
            "PUT",
            "/v1/services/model",
            Some(br#"{"version":1,"description":"rolled back"}"#),
            true,
        )
        .unwrap();
    says(&r, 200, "\"version\":1");
    says(
        &c.raw("DELETE", "/v1/services/model/versions/2", None, true)
            .unwrap(),
        409,
        &i.id,
    );
    says(
        &c.raw("DELETE", "/v1/services/model/versions/1", None, true)
            .unwrap(),
        409,
        "is the current version",
    );
    // Starts now run version 1 (a standby of version 2 is never served).
    let j = c.start("model").unwrap();
    assert_eq!(c.instance(&j.id).unwrap().version, Some(1));
    verify_guest(&j.endpoint);

    // Bad input: a clear error, nothing changed.
    let before_bad = catalogue(&c);
    for (m, p, body, code, needle) in [
        (
            "PUT",
            "/v1/services/nope",
            r#"{"version":1}"#,
            404,
            "no service named 'nope'",
        ),
        (
            "PUT",
            "/v1/services/model",
            r#"{"version":9}"#,
            404,
            "has no version 9",
        ),
        (
            "PUT",
            "/v1/services/model",
            r#"{"bogus":1}"#,
            400,
            "unknown field",
        ),
        (
            "PUT",
            "/v1/services/model",
            "not json",
            400,
            "malformed JSON",
        ),
        (
            "DELETE",
            "/v1/services/model/versions/x",
            "",
            400,
            "not a version number",
        ),
        (
            "DELETE",
            "/v1/services/model/versions/7",
            "",
            404,
            "has no version 7",
        ),
        (
            "GET",
            "/v1/services/nope/versions",
            "",
            404,
            "no service named 'nope'",
        ),
        (
            "GET",
            "/v1/services/Bad%20Name/versions",
            "",
            400,
            "not a valid name",
        ),
        (
            "PUT",
            "/v1/services/model/overlay",
            "not an overlay",
            422,
            "not usable",
        ),
        ("PUT", "/v1/services/model/overlay", "", 400, "empty"),
    ] {
        let r = c
            .raw(m, p, (!body.is_empty()).then_some(body.as_bytes()), true)
            .unwrap();
        says(&r, code, needle);
        assert!(
            r.json()["hint"].as_str().is_some_and(|h| !h.is_empty()),
            "{r:?}"
        );
    }
    let big = oversized(&a, "/v1/services/model/overlay");
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    assert_eq!(catalogue(&c), before_bad, "refusals change nothing");
    a.tmp_is_empty();

    // Once its instances stop, a version and then the service go.
    c.delete(&i.id).unwrap();
    let r = c
        .raw("DELETE", "/v1/services/model/versions/2", None, true)
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    assert_ne!(catalogue(&c), before);
    let vs: Vec<VersionView> = c.get_json("/v1/services/model/versions").unwrap();
    assert_eq!(vs.len(), 1);
    // A rename: refused while an instance runs; then the apps follow the new name.
    let rename = br#"{"name":"model-two"}"#;
    let r = c
        .raw("PUT", "/v1/services/model", Some(rename), true)
        .unwrap();
    says(&r, 409, "cannot be renamed while 1 instance(s) of it run");
    c.delete(&j.id).unwrap();
    let r = c
        .raw(
            "PUT",
            "/v1/services/model",
            Some(br#"{"name":"Bad Name"}"#),
            true,
        )
        .unwrap();
    says(&r, 400, "not a valid name");
    let r = c
        .raw("PUT", "/v1/services/model", Some(rename), true)
        .unwrap();
    says(&r, 200, "\"name\":\"model-two\"");
    says(
        &c.raw("GET", "/v1/services/model", None, true).unwrap(),
        404,
        "no service",
    );
    let app: AppRecord = c.get_json("/v1/apps/model-client").unwrap();
    assert_eq!(app.service.as_deref(), Some("model-two"));
    let k = c.start("model-two").unwrap();
    verify_guest(&k.endpoint);
    c.delete(&k.id).unwrap();
    let r = c
        .raw("DELETE", "/v1/services/model-two", None, true)
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    assert!(c.services().unwrap().is_empty());
    let events: Vec<String> = agent::audit::Audit::in_dir(&a.data)
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect();
    for e in [
        "service.imported",
        "service.version",
        "service.renamed",
        "service.deleted",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} not in {events:?}");
    }
}

#[test]
fn bases_are_uploaded_verified_and_removed() {
    let a = AgentProc::start("bases", &[]);
    let c = a.client();
    let d = Scratch::new("base-up");
    let micro = c.get_json::<BaseInfo>("/v1/bases/micro").unwrap();

    // The CLI's packing, uploaded with progress: verified and installed under a new name.
    let good = d.path("base.tar.zst");
    agent::manage::pack_base(&images().base, &good).unwrap();
    let mut seen = Vec::new();
    let b: BaseInfo = c
        .upload("/v1/bases/micro2", &good, &mut |s, t| seen.push((s, t)))
        .unwrap();
    assert_eq!(b.id, micro.id);
    assert_eq!(b.mem_mib, micro.mem_mib);
    let total = std::fs::metadata(&good).unwrap().len();
    assert_eq!(
        seen.last(),
        Some(&(total, total)),
        "progress reached the end"
    );
    assert!(
        b.bytes_on_disk < micro.mem_mib << 20,
        "the RAM file stays sparse: {b:?}"
    );

    // Refusals, each leaving the catalogue as it was.
    let before = catalogue(&c);
    let damaged = d.path("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    for e in std::fs::read_dir(&images().base).unwrap().flatten() {
        std::fs::copy(e.path(), damaged.join(e.file_name())).unwrap();
    }
    let k = damaged.join("kernel");
    let mut bytes = std::fs::read(&k).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&k, bytes).unwrap();
    let bad_id = d.path("damaged.tar.zst");
    agent::manage::pack_base(&damaged, &bad_id).unwrap();
    let mut stray = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..7].copy_from_slice(b"../evil");
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    stray.append(&h, &b"x"[..]).unwrap();
    let stray = stray.into_inner().unwrap();
    let mut only_manifest = tar::Builder::new(Vec::new());
    only_manifest
        .append_path_with_name(images().base.join("base.json"), "base.json")
        .unwrap();
    let only_manifest = only_manifest.into_inner().unwrap();
    for (path, body, code, needle) in [
        (
            "/v1/bases/micro3",
            std::fs::read(&bad_id).unwrap(),
            422,
            "hash to content id",
        ),
        ("/v1/bases/micro3", stray, 422, "holds only base.json"),
        ("/v1/bases/micro3", only_manifest, 422, "not usable"),
        (
            "/v1/bases/micro3",
            b"not a tar archive at all".to_vec(),
            422,
            "not usable",
        ),
        (
            "/v1/bases/micro2",
            std::fs::read(&good).unwrap(),
            409,
            "exists already",
        ),
        (
            "/v1/bases/No%20Such",
            b"x".to_vec(),
            400,
            "not a valid name",
        ),
    ] {
        let r = put(&c, path, &body);
        says(&r, code, needle);
        assert!(!r.body.contains(a.data.to_str().unwrap()), "{r:?}");
    }
    let big = oversized(&a, "/v1/bases/micro3");
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    says(
        &c.raw("DELETE", "/v1/bases/micro", None, true).unwrap(),
        409,
        "used by service(s) model",
    );
    says(
        &c.raw("DELETE", "/v1/bases/nope", None, true).unwrap(),
        404,
        "no base image named 'nope'",
    );
    assert_eq!(catalogue(&c), before);
    a.tmp_is_empty();

    // A service can be made on the uploaded base, and it cannot go while that service is.
    let r = c.raw("DELETE", "/v1/bases/micro2", None, true).unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    assert!(c.get_json::<BaseInfo>("/v1/bases/micro2").is_err());
    assert!(agent::audit::Audit::in_dir(&a.data)
        .events()
        .iter()
        .any(|e| e["event"] == "base.imported" && e["base"] == "micro2"));
}

#[test]
fn the_app_store_keeps_versions_with_checksums() {
    let a = AgentProc::start("appstore", &[]);
    let c = a.client();
    let d = Scratch::new("apps");
    let apk = d.path("client-2.apk");
    std::fs::write(&apk, vec![7u8; 300_000]).unwrap();

    // The CLI: upload with progress, then a checked download.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudlet"))
            .args(args)
            .args(["--agent", &a.url])
            .env(agent::auth::TOKEN_ENV, operator_token())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = cli(&[
        "upload-app",
        "model-client",
        apk.to_str().unwrap(),
        "--version",
        "2.0",
        "--platform",
        "android",
        "--service",
        "model",
    ]);
    assert!(ok, "{out}{err}");
    assert!(err.contains("100%"), "progress: {err}");
    let (sha, _) = sha256_file(&apk).unwrap();
    assert!(out.contains(&sha), "{out}");
    let newest: AppRecord = c.get_json("/v1/apps/model-client").unwrap();
    assert_eq!(
        (newest.version.as_str(), newest.platform.as_str()),
        ("2.0", "android")
    );
    assert_eq!(newest.service.as_deref(), Some("model"));
    let vs: Vec<AppRecord> = c.get_json("/v1/apps/model-client/versions").unwrap();
    assert_eq!(
        vs.iter().map(|v| v.version.as_str()).collect::<Vec<_>>(),
        ["2.0", "1.0"]
    );
    let got = d.path("got.apk");
    let (ok, out, err) = cli(&[
        "download-app",
        "model-client",
        "--out",
        got.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("(checked)"), "{out}{err}");
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&apk).unwrap());
    // An older version by its number, with its own checksum.
    let old = d.path("old.apk");
    let (n, old_sha) =
        agent::manage::download_checked(&c, "/v1/apps/model-client/download?version=1.0", &old)
            .unwrap();
    assert_eq!(old_sha, sha256_file(&images().app).unwrap().0);
    assert_eq!(n, std::fs::metadata(&images().app).unwrap().len());

    // Refusals leave the store as it was.
    let before = catalogue(&c);
    for (path, code, needle) in [
        (
            "/v1/apps/model-client/versions/3.0?file=c.apk&service=nope",
            404,
            "no service named 'nope'",
        ),
        ("/v1/apps/model-client/versions/3.0", 400, "malformed query"),
        (
            "/v1/apps/model-client/versions/3.0?file=c.apk&color=red",
            400,
            "malformed query",
        ),
        (
            "/v1/apps/model-client/versions/Big%20One?file=c.apk",
            400,
            "not a valid name",
        ),
        (
            "/v1/apps/model-client/versions/3.0?file=app.json",
            400,
            "not a valid name",
        ),
        (
            "/v1/apps/model-client/versions/3.0?file=..%2Fx",
            400,
            "not a valid name",
        ),
        (
            "/v1/apps/model-client/versions/3.0?file=c.apk&platform=Mac%20OS",
            400,
            "not a valid name",
        ),
    ] {
        says(&put(&c, path, b"bytes"), code, needle);
    }
    says(
        &put(&c, "/v1/apps/model-client/versions/3.0?file=c.apk", b""),
        400,
        "empty",
    );
    let big = oversized(&a, "/v1/apps/model-client/versions/3.0?file=c.apk");
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    for (m, p, code, needle) in [
        (
            "GET",
            "/v1/apps/model-client/download?version=9.9",
            404,
            "has no version '9.9'",
        ),
        (
            "GET",
            "/v1/apps/model-client/download?v=1",
            400,
            "malformed query",
        ),
        (
            "DELETE",
            "/v1/apps/model-client/versions/9.9",
            404,
            "has no version",
        ),
        ("DELETE", "/v1/apps/nope", 404, "no app named 'nope'"),
        ("GET", "/v1/apps/nope/versions", 404, "no app named 'nope'"),
    ] {
        says(&c.raw(m, p, None, true).unwrap(), code, needle);
    }
    assert_eq!(catalogue(&c), before);
    a.tmp_is_empty();

    // A device may list and download, not upload or delete.
    let phone = a.device("phone-1", Duration::from_secs(600));
    assert_eq!(
        phone
            .raw("GET", "/v1/apps/model-client/versions", None, true)
            .unwrap()
            .status,
        200
    );
    says(
        &put(&phone, "/v1/apps/x/versions/1?file=c.apk", b""),
        403,
        "operator's",
    );

    // Removal: one version, then the app.
    assert_eq!(
        c.raw("DELETE", "/v1/apps/model-client/versions/2.0", None, true)
            .unwrap()
            .status,
        204
    );
    let newest: AppRecord = c.get_json("/v1/apps/model-client").unwrap();
    assert_eq!(newest.version, "1.0");
    assert_eq!(
        c.raw("DELETE", "/v1/apps/model-client", None, true)
            .unwrap()
            .status,
        204
    );
    says(
        &c.raw("GET", "/v1/apps/model-client", None, true).unwrap(),
        404,
        "no app",
    );
}
