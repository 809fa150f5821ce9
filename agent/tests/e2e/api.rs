//! The client API end to end, against a real agent and real service VMs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use agent::client::Client;
use agent::store::sha256_file;

use crate::common::{board_text, images, verify_guest, wait_for, AgentProc, Scratch};

/// Start → verified replies through the forwarded port → stop → delete; and the read-only
/// routes (system, services, apps with checksums, overlay export, OpenAPI, metrics, page).
#[test]
fn start_call_stop_and_the_read_routes() {
    let a = AgentProc::start("e2e", &[]);
    let c = a.client();
    let sys = c.system().unwrap();
    assert_eq!(sys.board, "dev");
    assert_eq!(sys.services, vec!["model".to_string()]);
    assert_eq!(sys.bases.len(), 1);
    assert_eq!(sys.bases[0].mem_mib, 64);
    assert_eq!((sys.instances, sys.max_vms), (0, 4));

    let i = c.start("model").unwrap();
    assert_eq!(i.state, "running");
    assert!(i.endpoint.starts_with("127.0.0.1:"), "{i:?}");
    assert!(
        i.first_reply_ms.unwrap() > 0.0 && i.synthesis_ms.unwrap() > 0.0,
        "{i:?}"
    );
    verify_guest(&i.endpoint);
    assert_eq!(c.instances().unwrap().len(), 1);
    assert_eq!(c.system().unwrap().instances, 1);
    assert_eq!(c.services().unwrap()[0].instances, 1);

    let s = c.stop(&i.id).unwrap();
    assert_eq!(s.state, "stopped");
    assert_eq!(s.exit.as_deref(), Some("exit status 0"));
    assert!(
        TcpStream::connect(&i.endpoint).is_err(),
        "the forward is gone"
    );
    assert_eq!(c.instance(&i.id).unwrap().state, "stopped");
    c.delete(&i.id).unwrap();
    assert!(c.instances().unwrap().is_empty());
    assert!(a.live_vmms().is_empty());

    // Export: the bytes and checksum of the staged overlay.
    let out = a.dir.path("export.overlay");
    c.download_overlay("model", &out).unwrap();
    let (sha, _) = sha256_file(&out).unwrap();
    assert_eq!(sha, sha256_file(&images().overlay).unwrap().0);
    assert_eq!(c.services().unwrap()[0].overlay_sha256, sha);

    // App store: metadata with a checksum, and the file.
    let apps = c.raw("GET", "/v1/apps", None, true).unwrap().json();
    let app = &apps[0];
    assert_eq!(app["name"], "model-client");
    assert_eq!(app["service"], "model");
    assert_eq!(
        app["sha256"],
        sha256_file(&images().app).unwrap().0.as_str()
    );
    let one = c.raw("GET", "/v1/apps/model-client", None, true).unwrap();
    assert_eq!(one.status, 200);
    let file = c
        .raw("GET", "/v1/apps/model-client/download", None, true)
        .unwrap();
    assert_eq!(file.body.as_bytes(), std::fs::read(&images().app).unwrap());

    let doc = c
        .raw("GET", "/v1/openapi.json", None, false)
        .unwrap()
        .json();
    assert!(doc["paths"]["/v1/instances"]["post"].is_object());
    let page = c.raw("GET", "/", None, false).unwrap();
    assert!(page.body.contains("Cloudlet manager"));
    let m = c.raw("GET", "/metrics", None, true).unwrap().body;
    assert!(m.contains("cloudlet_start_latency_ms_count 1"), "{m}");
    assert!(
        m.contains(
            "cloudlet_api_requests_total{route=\"/v1/instances\",method=\"POST\",status=\"201\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains("cloudlet_instances{state=\"running\"} 0"), "{m}");
}

/// The start request of the sample service.
const START_MODEL: &[u8] = br#"{"service":"model"}"#;

/// Sends `method path` (with `body` as JSON, and `c`'s token), checks the
/// answer is `status`, and that each `(key, needle)` names a JSON string field holding
/// `needle`.
fn refused(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    status: u16,
    json: &[(&str, &str)],
) {
    let r = c.raw(method, path, body, true).unwrap();
    assert_eq!(r.status, status, "{method} {path}: {r:?}");
    for (key, needle) in json {
        assert!(
            r.json()[key].as_str().unwrap().contains(needle),
            "{method} {path}: {key} should hold {needle:?}: {r:?}"
        );
    }
}

/// `POST /v1/instances` of the sample service by `c`, refused with `status` (see
/// [`refused`]).
fn start_refused(c: &Client, status: u16, json: &[(&str, &str)]) {
    refused(c, "POST", "/v1/instances", Some(START_MODEL), status, json);
}

/// 404 for an unknown service, 400 with the parser's message for malformed JSON, 401 for a
/// missing or wrong token (and nothing started), JSON errors with hints everywhere.
#[test]
fn errors_and_authentication() {
    let a = AgentProc::start("errors", &[]);
    let c = a.client();
    let post = "/v1/instances";
    refused(
        &c,
        "POST",
        post,
        Some(br#"{"service":"nope"}"#),
        404,
        &[("error", "nope"), ("hint", "/v1/services")],
    );
    refused(
        &c,
        "POST",
        post,
        Some(br#"{"service": "#),
        400,
        &[("error", "EOF while parsing")],
    );
    refused(
        &c,
        "POST",
        post,
        Some(br#"{"svc": "model"}"#),
        400,
        &[("error", "unknown field")],
    );
    for who in [a.anon(), a.client_with(Some("wrong-token"))] {
        start_refused(&who, 401, &[("hint", "Bearer")]);
        refused(&who, "DELETE", "/v1/services/model", None, 401, &[]);
    }
    assert!(c.instances().unwrap().is_empty());
    assert_eq!(c.services().unwrap().len(), 1);
    refused(&c, "GET", "/v1/services/nope", None, 404, &[]);
    refused(&c, "GET", "/v1/instances/i-00000000", None, 404, &[]);
    refused(&c, "GET", "/v2/nothing", None, 404, &[("hint", "openapi")]);
}

/// max_vms and the memory reserve → 503 with the reason; a freed slot is usable again.
#[test]
fn limits_refuse_with_503() {
    let a = AgentProc::start("limits", &[("max_vms = 4", "max_vms = 2")]);
    let c = a.client();
    let i1 = c.start("model").unwrap();
    let _i2 = c.start("model").unwrap();
    start_refused(&c, 503, &[("error", "max_vms")]);
    c.delete(&i1.id).unwrap();
    let i3 = c.start("model").unwrap();
    verify_guest(&i3.endpoint);
    drop(a);

    // 64 MiB for service VMs: one 64 MiB guest fits, a second does not.
    let b = AgentProc::start("limits-mem", &[("memory_mib = 1024", "memory_mib = 64")]);
    let c = b.client();
    c.start("model").unwrap();
    start_refused(&c, 503, &[("error", "MiB")]);
}

/// Sends a raw HTTP request and returns the status line's code.
fn raw_put(addr: &str, head: &str, body: &[u8], chunked: bool) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before taking the whole body: ignore write errors.
    for piece in body.chunks(64 << 10) {
        let ok = if chunked {
            s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .and_then(|_| s.write_all(piece))
                .and_then(|_| s.write_all(b"\r\n"))
        } else {
            s.write_all(piece)
        };
        if ok.is_err() {
            break;
        }
    }
    if chunked {
        let _ = s.write_all(b"0\r\n\r\n");
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

/// Oversize (declared or streamed) and corrupt uploads are refused and install nothing; a
/// good upload installs a service that then starts and answers.
#[test]
fn overlay_uploads_are_verified_before_install() {
    let a = AgentProc::start("upload", &[("max_upload_mib = 256", "max_upload_mib = 2")]);
    let c = a.client();
    let addr = a.addr();
    let auth = format!("Authorization: Bearer {}\r\n", a.token());

    let big = vec![0x5au8; 3 << 20];
    let head = format!(
        "PUT /v1/services/big/overlay HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    );
    assert_eq!(raw_put(&addr, &head, &[], false), 413);
    let head = format!(
        "PUT /v1/services/big/overlay HTTP/1.1\r\nHost: {addr}\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_put(&addr, &head, &big, true), 413);

    // Corrupt: one byte flipped inside a chunk; and not an overlay at all.
    let mut bad = std::fs::read(&images().overlay).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let badp = a.dir.path("bad.overlay");
    std::fs::write(&badp, &bad).unwrap();
    let e = c.upload_overlay("bad", &badp).unwrap_err().to_string();
    assert!(
        e.contains("422") && e.contains("the uploaded overlay is not usable: chunk"),
        "{e}"
    );
    // The error names no path of the server's.
    assert!(
        !e.contains(a.data.to_str().unwrap()) && !e.contains("/tmp"),
        "{e}"
    );
    let junk = a.dir.path("junk.overlay");
    std::fs::write(&junk, b"not an overlay").unwrap();
    let e = c.upload_overlay("junk", &junk).unwrap_err().to_string();
    assert!(e.contains("422"), "{e}");
    // Without a token. A small body: the agent refuses before reading it, and with a body
    // of megabytes the client could get a broken pipe instead of reading the 401.
    let e = a
        .anon()
        .upload_overlay("anon", &junk)
        .unwrap_err()
        .to_string();
    assert!(e.contains("401"), "{e}");

    let names: Vec<String> = c.services().unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["model".to_string()], "nothing was installed");
    for n in ["big", "bad", "junk", "anon"] {
        assert!(!a.data.join("services").join(n).exists(), "{n}");
    }
    assert_eq!(
        std::fs::read_dir(a.data.join("tmp")).unwrap().count(),
        0,
        "tmp/ is clean"
    );

    // A good upload: created, then startable.
    let s = c.upload_overlay("model2", &images().overlay).unwrap();
    assert_eq!(s.base, "micro");
    let i = c.start("model2").unwrap();
    verify_guest(&i.endpoint);
}

/// A vmm killed under the agent → the instance is reported failed with its exit status; the
/// agent carries on and starts new instances.
#[test]
fn a_killed_vmm_is_reported_failed() {
    let a = AgentProc::start("kill", &[]);
    let c = a.client();
    let i = c.start("model").unwrap();
    let pid = i.pid.unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let f = wait_for(Duration::from_secs(10), "the instance to fail", || {
        let v = c.instance(&i.id).unwrap();
        (v.state == "failed").then_some(v)
    });
    assert_eq!(f.exit.as_deref(), Some("killed by signal 9"), "{f:?}");
    assert!(f.error.unwrap().contains("unexpectedly"));
    assert_eq!(c.system().unwrap().instances, 0);
    let j = c.start("model").unwrap();
    verify_guest(&j.endpoint);
    let m = c.raw("GET", "/metrics", None, true).unwrap().body;
    assert!(m.contains("cloudlet_instances{state=\"failed\"} 1"), "{m}");
}

/// An agent restart re-adopts a running instance (it keeps serving and can be stopped by
/// the new agent) and reports one whose vmm died meanwhile as failed.
#[test]
fn a_restarted_agent_readopts_running_instances() {
    let mut a = AgentProc::start_opts("restart", &[], false);
    let c = a.client();
    let live = c.start("model").unwrap();
    let doomed = c.start("model").unwrap();
    assert!(a.terminate().unwrap().success());
    assert!(
        agent::supervisor::pid_alive(live.pid.unwrap()),
        "instances outlive the agent"
    );
    std::process::Command::new("kill")
        .args(["-KILL", &doomed.pid.unwrap().to_string()])
        .status()
        .unwrap();
    wait_for(Duration::from_secs(5), "the vmm to die", || {
        (!agent::supervisor::pid_alive(doomed.pid.unwrap())).then_some(())
    });
    a.spawn();
    let c = a.client();
    let v = c.instance(&live.id).unwrap();
    assert_eq!((v.state.as_str(), v.adopted), ("running", true), "{v:?}");
    assert_eq!(v.owner.as_deref(), Some("operator"), "the owner is kept");
    assert_eq!(v.endpoint, live.endpoint);
    verify_guest(&v.endpoint);
    let d = c.instance(&doomed.id).unwrap();
    assert_eq!(d.state, "failed", "{d:?}");
    assert_eq!(c.system().unwrap().instances, 1);
    let s = c.delete(&live.id).unwrap();
    assert_eq!(s.state, "stopped");
    assert!(!agent::supervisor::pid_alive(live.pid.unwrap()));
    assert!(a.live_vmms().is_empty());
}

/// Scopes end to end, with real service VMs: a paired device starts an instance (its own),
/// a second device neither sees nor touches it, the device downloads apps but reaches no
/// operator route, nothing about instances or apps is served without a credential; the
/// operator lists and revokes devices with the CLI (no secret on its command line), and the
/// revoked device gets 401 on its very next request, as does an expired one.
#[test]
fn devices_own_their_instances_and_lose_access_when_revoked() {
    use agent::devices::DEFAULT_TTL;
    let a = AgentProc::start("devices", &[]);
    let op = a.client();
    let phone = a.device("phone-a", DEFAULT_TTL);
    let other = a.device("phone-b", DEFAULT_TTL);
    let i = phone.start("model").unwrap();
    assert_eq!(i.owner.as_deref(), Some("device:phone-a"), "{i:?}");
    verify_guest(&i.endpoint);
    assert_eq!(phone.instances().unwrap().len(), 1);
    assert!(other.instances().unwrap().is_empty(), "not another's");
    let mine = format!("/v1/instances/{}", i.id);
    for (m, p) in [
        ("GET", mine.clone()),
        ("POST", format!("{mine}/stop")),
        ("DELETE", mine.clone()),
    ] {
        refused(
            &other,
            m,
            &p,
            None,
            403,
            &[("error", "not device:phone-b's")],
        );
    }
    assert_eq!(op.instance(&i.id).unwrap().state, "running");
    verify_guest(&i.endpoint);
    for (m, p) in [
        ("GET", "/v1/devices"),
        ("GET", "/metrics"),
        ("GET", "/v1/services/model/overlay"),
        ("DELETE", "/v1/services/model"),
    ] {
        refused(&phone, m, p, None, 403, &[("error", "operator's")]);
    }
    let app = phone
        .raw("GET", "/v1/apps/model-client/download", None, true)
        .unwrap();
    assert_eq!(app.body.as_bytes(), std::fs::read(&images().app).unwrap());
    for p in [
        mine.as_str(),
        "/v1/instances",
        "/v1/services/model/overlay",
        "/v1/apps/model-client/download",
        "/metrics",
    ] {
        refused(
            &a.anon(),
            "GET",
            p,
            None,
            401,
            &[("hint", "operator.token")],
        );
    }

    let cloudlet = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudlet"))
            .env_remove(agent::auth::TOKEN_ENV)
            .args(["--agent", &a.url, "--token-file"])
            .arg(a.token_file())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "cloudlet {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let list = cloudlet(&["devices"]);
    assert!(
        list.contains("phone-a") && list.contains("phone-b") && list.contains("active"),
        "{list}"
    );
    let out = cloudlet(&["revoke", "phone-a"]);
    assert!(out.contains("phone-a") && out.contains("revoked"), "{out}");
    refused(
        &phone,
        "GET",
        "/v1/instances",
        None,
        401,
        &[("error", "not valid")],
    );
    refused(&phone, "DELETE", &mine, None, 401, &[]);
    assert!(
        other.instances().unwrap().is_empty(),
        "phone-b is unaffected"
    );
    // The operator still manages the revoked device's instance.
    assert_eq!(op.delete(&i.id).unwrap().state, "stopped");
    assert!(a.live_vmms().is_empty());

    // Expiry.
    let brief = a.device("phone-c", Duration::from_secs(2));
    assert!(brief.instances().unwrap().is_empty());
    let exp = agent::devices::DeviceStore::in_dir(&a.data)
        .get("phone-c")
        .unwrap()
        .expires_unix;
    while agent::store::unix_now() < exp {
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(&brief, "GET", "/v1/instances", None, 401, &[]);
    let audit = std::fs::read_to_string(a.data.join(agent::audit::AUDIT_FILE)).unwrap();
    assert_eq!(audit.matches("device.paired").count(), 3, "{audit}");
    assert_eq!(audit.matches("device.revoked").count(), 1, "{audit}");
}

/// The operator token: made by the agent on first start (mode 0600, announced), never in the
/// board file (a file that still has one is refused saying where it goes now), and a token
/// file group or others may read is refused.
#[test]
fn the_operator_token_is_made_on_first_start_and_never_in_the_board_file() {
    let s = Scratch::new("optoken");
    let agent_cmd = |board: &str, data: &str, extra: &[&str]| {
        let b = s.path("board.toml");
        std::fs::write(&b, board).unwrap();
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_agent"));
        c.env_remove(agent::auth::TOKEN_ENV)
            .arg("--config")
            .arg(&b)
            .arg("--data-dir")
            .arg(s.path(data))
            .args(["--no-discovery", "--port", "0"])
            .args(extra);
        c
    };
    // A board file with a token.
    let old = board_text(&[("port = 0", "port = 0\ntoken = \"cloudlet-dev-token\"")]);
    let out = agent_cmd(&old, "d0", &["check-config"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("api.token")
            && err.contains("operator.token")
            && err.contains("CLOUDLET_TOKEN"),
        "{err}"
    );
    // A token file others may read.
    let f = s.path("open.token");
    std::fs::write(&f, "an-operator-token-0123456789\n").unwrap();
    let out = agent_cmd(
        &board_text(&[]),
        "d1",
        &["--token-file", f.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("chmod 600") && err.contains("open.token"),
        "{err}"
    );
    // First start: made, private, announced; it opens the operator's routes.
    let child = agent_cmd(&board_text(&[]), "d2", &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = wait_for(Duration::from_secs(20), "the agent to listen", || {
        std::fs::read_to_string(s.path("d2/api.addr")).ok()
    });
    let tf = s.path("d2").join(agent::auth::OPERATOR_TOKEN_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&tf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = agent::auth::read_secret_file(&tf).unwrap();
    let c = Client::new(&format!("http://{}", addr.trim()), Some(&token));
    assert!(c.instances().unwrap().is_empty());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("made the operator token") && said.contains(tf.to_str().unwrap()),
        "{said}"
    );
    assert!(!said.contains(&token), "the token itself is never printed");
}

/// A start the vmm refuses (a damaged overlay) says why, naming the file but no server path,
/// in the answer and in the failed instance's record alike; the agent's log keeps the paths.
#[test]
fn a_refused_start_names_no_server_path() {
    let a = AgentProc::start("no-paths", &[]);
    let overlay = a.data.join("services/model/versions/1/app.overlay");
    let mut bytes = std::fs::read(&overlay).unwrap();
    bytes[200] ^= 1;
    std::fs::write(&overlay, &bytes).unwrap();
    let c = a.client();
    let err = c.start("model").unwrap_err().to_string();
    let data = a.data.display().to_string();
    let no_path = |text: &str| {
        assert!(
            text.contains("app.overlay") && !text.contains(&data) && !text.contains("/services/"),
            "{text}"
        );
    };
    no_path(&err);
    let failed = wait_for(Duration::from_secs(10), "the failed instance", || {
        c.instances()
            .unwrap()
            .into_iter()
            .find(|i| i.state == "failed")
    });
    no_path(failed.error.as_deref().unwrap());
    assert!(a.log().contains(&data), "the log keeps the paths");
}
