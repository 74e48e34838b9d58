//! Bad image input through the API with real files: corrupt and truncated qcow2, a text file,
//! an upload cut off half-way, a body that does not match its signed hash. Each is refused with
//! a clear error and leaves nothing behind; a valid raw disk then uploads fine.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kumo_cli::ClientError;
use kumo_types::api::{ImportImage, UploadParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::Cloud;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("hash")
        .to_string()
}

/// Pseudo-random bytes (xorshift; reproducible, no extra crates).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Inputs {
    corrupt: PathBuf,
    truncated: PathBuf,
    text: PathBuf,
    raw: PathBuf,
}

fn make_inputs(dir: &Path) -> Inputs {
    // A qcow2 header (from a real image) followed by garbage where its tables should be.
    let good = dir.join("good.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&good)
        .arg("64M"));
    let mut corrupt = std::fs::read(&good).expect("read qcow2");
    assert_eq!(&corrupt[..4], b"QFI\xfb", "qemu-img made a qcow2");
    corrupt.truncate(512);
    corrupt.extend(noise(1 << 20, 1));
    let corrupt_path = dir.join("corrupt.qcow2");
    std::fs::write(&corrupt_path, &corrupt).expect("write");

    // A real qcow2 full of data, cut in half.
    let raw_src = dir.join("random.raw");
    std::fs::write(&raw_src, noise(8 << 20, 2)).expect("write");
    let full = dir.join("full.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw_src)
        .arg(&full));
    let check = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&full)
        .status()
        .expect("qemu-img check");
    assert!(check.success(), "the uncut qcow2 is valid");
    let bytes = std::fs::read(&full).expect("read");
    assert!(bytes.len() > 8 << 20, "the qcow2 holds the data");
    let truncated = dir.join("truncated.qcow2");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");

    // Not a disk image at all (a multiple of 512 bytes, so only the content can give it away).
    let text = dir.join("notes.txt");
    let mut t = "These are my notes. This is not a disk image.\n"
        .repeat(200)
        .into_bytes();
    t.resize(8192, b'\n');
    std::fs::write(&text, t).expect("write");

    // A valid raw disk: MBR with one partition and the 0x55AA signature, data in the middle.
    let mut raw = vec![0u8; 4 << 20];
    raw[446..462].copy_from_slice(&[
        0x80, 0, 2, 0, 0x83, 0, 0, 0, 0x00, 0x08, 0, 0, 0x00, 0x18, 0, 0,
    ]);
    raw[510] = 0x55;
    raw[511] = 0xaa;
    raw[1 << 20..(1 << 20) + 65536].copy_from_slice(&noise(65536, 3));
    let raw_path = dir.join("disk.raw");
    std::fs::write(&raw_path, raw).expect("write");
    Inputs {
        corrupt: corrupt_path,
        truncated,
        text,
        raw: raw_path,
    }
}

fn params(name: &str) -> UploadParams {
    UploadParams {
        name: name.into(),
        ..Default::default()
    }
}

/// Server-side import of `path`: must fail, returns the operation's error.
async fn import_fails(cloud: &Cloud, name: &str, path: &Path) -> String {
    let req = ImportImage {
        name: name.into(),
        kind: None,
        path: path.display().to_string(),
        format: None,
        kernel_id: None,
        ramdisk_id: None,
        cmdline: None,
        public: false,
    };
    let started = match cloud.client.import_image(&req).await {
        Ok(s) => s,
        Err(e) => return e.to_string(), // refused up front
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let op = cloud
            .client
            .operation(&started.operation.id)
            .await
            .expect("operation");
        match op.state.as_str() {
            "failed" => {
                let img = cloud.client.image(&started.image.id).await;
                assert!(img.is_err(), "a failed import is not listed: {img:?}");
                return op.error.expect("a failed operation says why");
            }
            "succeeded" => panic!("import of {name} ({}) succeeded", path.display()),
            _ => {}
        }
        assert!(Instant::now() < deadline, "import of {name} never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Upload through the client: must be refused with an API error; returns its message (without
/// the error code, so the words checked are the explanation's).
async fn upload_fails(cloud: &Cloud, name: &str, path: &Path) -> String {
    match cloud.client.upload_image(&params(name), path, |_| {}).await {
        Ok(r) => panic!("upload of {} was accepted: {:?}", path.display(), r.image),
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => {
            assert!(
                (400..500).contains(&status),
                "a bad image is the client's fault (4xx), got {status} {code}: {message}"
            );
            assert!(
                !message.contains("does not match"),
                "the body arrived intact, yet: {message}"
            );
            message
        }
        Err(e) => panic!(
            "upload of {} failed without an API error: {e}",
            path.display()
        ),
    }
}

fn assert_mentions(msg: &str, words: &[&str]) {
    eprintln!("refused: {}", msg.chars().take(300).collect::<String>());
    let m = msg.to_ascii_lowercase();
    assert!(
        words.iter().any(|w| m.contains(w)),
        "error {msg:?} should mention one of {words:?}"
    );
}

/// Upload `send` while signing `signed` (its sha256 goes in x-amz-content-sha256).
fn signed_upload_headers(
    cloud: &Cloud,
    name: &str,
    signed: &[u8],
) -> (reqwest::Url, Vec<(String, String)>) {
    let url = cloud
        .client
        .url(&format!("/api/v1/images/upload?name={name}"))
        .expect("url");
    let headers = cloud.client.sign("PUT", &url, signed, &[]).expect("sign");
    assert!(
        headers.iter().any(|(k, _)| k == "x-amz-content-sha256"),
        "the signature covers the body hash"
    );
    (url, headers)
}

/// Sends the request head (announcing all of `body`) and the first half of it, then hangs up
/// (`drop`) or only stops sending (`half-close`). Returns whatever came back.
async fn upload_cut_off(cloud: &Cloud, name: &str, body: &[u8], hang_up: bool) -> String {
    let (url, headers) = signed_upload_headers(cloud, name, body);
    let host = format!("127.0.0.1:{}", cloud.port);
    let mut sock = tokio::net::TcpStream::connect(&host)
        .await
        .expect("connect");
    let mut head = format!("PUT {}?{} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n", url.path(), url.query().unwrap_or(""), body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await.expect("send head");
    sock.write_all(&body[..body.len() / 2])
        .await
        .expect("send half");
    sock.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    if hang_up {
        drop(sock);
        return String::new();
    }
    sock.shutdown().await.expect("half-close");
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

/// Files in the controller's image directory.
fn image_files(cloud: &Cloud) -> BTreeSet<String> {
    std::fs::read_dir(cloud.data_dir().join("images"))
        .expect("images dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_are_refused_and_leave_nothing() {
    let t0 = Instant::now();
    let cloud = Cloud::controller_only().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let inp = make_inputs(dir.path());
    let bad_names = [
        "corrupt",
        "truncated",
        "text",
        "half-drop",
        "half-close",
        "mismatch",
    ];

    // Server-side import.
    let e = import_fails(&cloud, "corrupt", &inp.corrupt).await;
    assert_mentions(&e, &["corrupt"]);
    let e = import_fails(&cloud, "truncated", &inp.truncated).await;
    assert_mentions(&e, &["truncated", "end of the file"]);
    let e = import_fails(&cloud, "text", &inp.text).await;
    assert_mentions(&e, &["not a known image format", "not a disk"]);

    // The same files uploaded.
    let e = upload_fails(&cloud, "corrupt", &inp.corrupt).await;
    assert_mentions(&e, &["corrupt"]);
    let e = upload_fails(&cloud, "truncated", &inp.truncated).await;
    assert_mentions(&e, &["truncated", "end of the file"]);
    let e = upload_fails(&cloud, "text", &inp.text).await;
    assert_mentions(&e, &["not a known image format", "not a disk"]);

    // A body that does not match the hash it was signed with (same length, one byte differs).
    let good = std::fs::read(&inp.raw).expect("read");
    let mut evil = good.clone();
    evil[(2 << 20) + 17] ^= 0xff;
    let (url, headers) = signed_upload_headers(&cloud, "mismatch", &good);
    let mut rb = reqwest::Client::new()
        .put(url)
        .header("content-type", "application/octet-stream");
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    let resp = rb.body(evil).send().await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, 400, "mismatched body refused: {body}");
    assert_mentions(&body, &["does not match"]);

    // An upload that stops half-way: the client stops sending, and the server says why.
    let reply = upload_cut_off(&cloud, "half-close", &good, false).await;
    assert!(
        reply.starts_with("HTTP/1.1 4"),
        "a cut-off upload is refused: {reply:?}"
    );
    assert_mentions(&reply, &["truncated", "ended", "incomplete", "short"]);
    // ... and one whose client vanishes mid-body.
    upload_cut_off(&cloud, "half-drop", &good, true).await;

    // Nothing of the bad uploads is left, in the API or on disk (give the server a moment
    // to notice the vanished client).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let images = cloud.client.images().await.expect("images");
        let listed: Vec<_> = images
            .iter()
            .filter(|i| bad_names.contains(&i.name.as_str()))
            .map(|i| format!("{} {} {}", i.name, i.id, i.state))
            .collect();
        let files = image_files(&cloud);
        // Every bad input was taken in and then failed (none was silently abandoned):
        // 3 imports, 3 uploads, the mismatch and the two cut-off uploads.
        let failed = cloud
            .client
            .events(1000)
            .await
            .expect("events")
            .into_iter()
            .filter(|e| e.action == "image.imported" && e.result == "failed")
            .count();
        if listed.is_empty() && files.is_empty() && failed == 9 {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: images {listed:?}, files {files:?}, {failed} failed imports journaled; server log {}", cloud.dir.path().join("server.log").display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A valid raw disk uploads fine: right hash, right size, same content.
    let ok = cloud
        .client
        .upload_image(&params("good-raw"), &inp.raw, |_| {})
        .await
        .expect("upload a valid raw disk");
    assert_eq!(ok.image.state, "available", "{:?}", ok.image);
    assert_eq!(ok.operation.state, "succeeded");
    assert_eq!(ok.image.source_format.as_deref(), Some("raw"));
    assert_eq!(ok.image.virtual_size, Some(4 << 20));
    let stored = cloud.data_dir().join("images").join(&ok.image.id);
    assert_eq!(
        ok.image.sha256.as_deref(),
        Some(sha256_of(&stored).as_str()),
        "sha256 is the stored file's"
    );
    assert_eq!(
        ok.image.file_size,
        Some(std::fs::metadata(&stored).expect("stored").len())
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(&inp.raw)
        .arg(&stored)
        .status()
        .expect("qemu-img compare");
    assert!(cmp.success(), "the stored image has the uploaded content");
    let listed: Vec<String> = cloud
        .client
        .images()
        .await
        .expect("images")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(listed, vec!["good-raw".to_string()]);
    assert_eq!(
        image_files(&cloud),
        BTreeSet::from([ok.image.id.clone()]),
        "only the good image's file"
    );
    // The same name again is fine too, and so is the hash of the upload seen by the server.
    let again = cloud.client.image("good-raw").await.expect("by name");
    assert_eq!(again.id, ok.image.id);
    eprintln!(
        "images::bad_images_are_refused_and_leave_nothing took {:?}",
        t0.elapsed()
    );
}
