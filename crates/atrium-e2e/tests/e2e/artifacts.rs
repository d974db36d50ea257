//! The artifact store end to end: uploads of artifacts written by atrium-artifact and by
//! Debian's mender-artifact, Mender's uniqueness rule, refusals that leave nothing behind,
//! signed download links with range requests that resume a broken download, deletion, audit.

use std::path::{Path, PathBuf};
use std::process::Command;

use atrium_artifact::{
    Compression, FileSource, PayloadKind, PayloadSpec, SigningKey, WriteOptions, WriteSpec,
};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::harness::{Backend, TestServer};

crate::both_backends!(
    artifacts_upload_list_download_delete,
    deltas_made_by_the_server
);

const MEDIA: &str = "application/vnd.mender-artifact";

fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {program} ({e}): install Debian's mender-artifact and openssl with scripts/ota-deps")
    });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A payload of `len` pseudo-random bytes.
pub(crate) fn payload(dir: &Path, len: usize) -> PathBuf {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = dir.join("rootfs.img");
    std::fs::write(&path, data).expect("payload");
    path
}

/// An artifact written by atrium-artifact.
fn atrium_artifact(
    dir: &Path,
    name: &str,
    types: &[&str],
    file: &Path,
    key: Option<&SigningKey>,
) -> Vec<u8> {
    let spec = WriteSpec {
        name: name.to_owned(),
        device_types: types.iter().map(|t| (*t).to_owned()).collect(),
        depends_artifact_names: Vec::new(),
        provides_group: None,
        depends_groups: Vec::new(),
        scripts: Vec::new(),
        payload: PayloadSpec::new(
            PayloadKind::RootfsImage,
            vec![FileSource::Path(file.to_owned())],
        ),
    };
    let mut out = Vec::new();
    atrium_artifact::write(
        &spec,
        &mut out,
        WriteOptions {
            compression: Compression::Gzip,
            key,
            temp_dir: Some(dir.to_owned()),
            progress: None,
        },
    )
    .expect("write artifact");
    out
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) async fn upload(server: &TestServer, body: Vec<u8>, query: &str) -> (StatusCode, Value) {
    let response = server
        .http()
        .post(format!("{}/api/v1/artifacts{query}", server.api_url()))
        .bearer_auth(&server.token)
        .header("content-type", MEDIA)
        .body(body)
        .send()
        .await
        .expect("upload");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn blob_files(server: &TestServer) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(server.config.data_dir.join("artifacts"))
        .expect("artifact dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn artifacts_upload_list_download_delete(backend: Backend) {
    let server = TestServer::start(backend).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = payload(dir.path(), 3 << 20);
    let ours = atrium_artifact(dir.path(), "release-1", &["pi4", "pi5"], &image, None);
    let theirs_path = dir.path().join("mender.mender");
    run_ok(
        "mender-artifact",
        &[
            "write",
            "rootfs-image",
            "-n",
            "mender-1",
            "-t",
            "pi4",
            "-f",
            s(&image),
            "-o",
            s(&theirs_path),
        ],
    );
    let theirs = std::fs::read(&theirs_path).expect("mender artifact");

    // Upload both; the server reads the header while the bytes stream in.
    let (status, a) = upload(&server, ours.clone(), "?description=nightly").await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    assert_eq!(a["name"], "release-1");
    assert_eq!(a["device_types"], serde_json::json!(["pi4", "pi5"]));
    assert_eq!(a["sha256"], sha256(&ours));
    assert_eq!(a["size"], ours.len());
    assert_eq!(a["signed"], false);
    assert_eq!(a["description"], "nightly");
    assert_eq!(a["payload_types"], serde_json::json!(["rootfs-image"]));
    assert_eq!(a["provides"]["artifact_name"], "release-1");
    assert!(
        a["provides"]["rootfs-image.checksum"].is_string(),
        "payload provides are kept: {a}"
    );
    assert!(
        a["clears_provides"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{a}"
    );
    let a_id = a["id"].as_str().expect("id").to_owned();
    let (status, b) = upload(&server, theirs.clone(), "").await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    assert_eq!(b["name"], "mender-1");
    assert_eq!(b["sha256"], sha256(&theirs));
    let b_id = b["id"].as_str().expect("id").to_owned();

    // Mender's rule: the same name for an overlapping device type is refused.
    let again = atrium_artifact(dir.path(), "release-1", &["pi5"], &image, None);
    let (status, body) = upload(&server, again, "").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("pi5"),
        "{body}"
    );

    // Damaged and non-artifacts are refused with the reason, leaving nothing behind.
    let mut damaged = ours.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    let (status, body) = upload(&server, damaged, "").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(!body["error"].as_str().unwrap_or("").is_empty(), "{body}");
    let (status, body) = upload(&server, b"hello, not a tar".to_vec(), "").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("tar"),
        "{body}"
    );
    let mut expected = vec![a_id.clone(), b_id.clone()];
    expected.sort();
    assert_eq!(
        blob_files(&server),
        expected,
        "only accepted artifacts stay"
    );

    // List, filters, show.
    let (status, all) = server.get("/api/v1/artifacts").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let (_, pi5) = server.get("/api/v1/artifacts?device_type=pi5").await;
    assert_eq!(pi5.as_array().map(Vec::len), Some(1), "{pi5}");
    assert_eq!(pi5[0]["id"], a_id.as_str());
    let (_, named) = server.get("/api/v1/artifacts?name=mender-1").await;
    assert_eq!(named[0]["id"], b_id.as_str());
    let (status, shown) = server.get(&format!("/api/v1/artifacts/{a_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown, a);

    // A signed link for devices; no token needed, the signature is the credential.
    let (status, link) = server
        .post(
            &format!("/api/v1/artifacts/{b_id}/link"),
            serde_json::json!({"ttl_s": 600}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{link}");
    let url = format!(
        "{}{}",
        server.api_url(),
        link["path"].as_str().expect("path")
    );
    let full = server.http().get(&url).send().await.expect("download");
    assert_eq!(full.status(), StatusCode::OK);
    assert_eq!(full.headers()["accept-ranges"], "bytes");
    let etag = full.headers()["etag"].to_str().expect("etag").to_owned();
    let full = full.bytes().await.expect("body");
    assert_eq!(sha256(&full), sha256(&theirs));

    // A download that breaks off after some bytes, resumed with Range + If-Range.
    let mut partial = Vec::new();
    let mut broken = server.http().get(&url).send().await.expect("download");
    while partial.len() < 100_000 {
        let chunk = broken.chunk().await.expect("chunk").expect("more bytes");
        partial.extend_from_slice(&chunk);
    }
    drop(broken);
    let rest = server
        .http()
        .get(&url)
        .header("range", format!("bytes={}-", partial.len()))
        .header("if-range", &etag)
        .send()
        .await
        .expect("resume");
    assert_eq!(rest.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        rest.headers()["content-range"],
        format!(
            "bytes {}-{}/{}",
            partial.len(),
            theirs.len() - 1,
            theirs.len()
        )
        .as_str()
    );
    partial.extend_from_slice(&rest.bytes().await.expect("rest"));
    assert_eq!(
        sha256(&partial),
        sha256(&theirs),
        "resumed download is whole"
    );
    // A stale If-Range gets the whole file; a range past the end is 416.
    let stale = server
        .http()
        .get(&url)
        .header("range", "bytes=10-")
        .header("if-range", "\"other\"")
        .send()
        .await
        .expect("stale");
    assert_eq!(stale.status(), StatusCode::OK);
    let past = server
        .http()
        .get(&url)
        .header("range", format!("bytes={}-", theirs.len()))
        .send()
        .await
        .expect("past");
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        past.headers()["content-range"],
        format!("bytes */{}", theirs.len()).as_str()
    );
    // A link for another artifact, or with another expiry, is refused.
    let forged = url.replace(&b_id, &a_id);
    let status = server
        .http()
        .get(&forged)
        .send()
        .await
        .expect("forged")
        .status();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let expires = link["expires"].as_u64().expect("expires");
    let stretched = url.replace(
        &format!("expires={expires}"),
        &format!("expires={}", expires + 1),
    );
    let status = server
        .http()
        .get(&stretched)
        .send()
        .await
        .expect("stretched")
        .status();
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The operators' download needs a token.
    let anonymous = server
        .http()
        .get(format!(
            "{}/api/v1/artifacts/{a_id}/download",
            server.api_url()
        ))
        .send()
        .await
        .expect("anonymous");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // The CLI: list, download (resuming a partial file), delete.
    let cli = atrium_cli(&server);
    let listed = cli(&["artifact", "list", "--json"]);
    assert!(listed.contains(&a_id) && listed.contains(&b_id), "{listed}");
    let out = dir.path().join("download.mender");
    std::fs::write(&out, &ours[..50_000]).expect("partial file");
    let said = cli(&["artifact", "download", &a_id, "-o", s(&out)]);
    assert!(said.contains(&sha256(&ours)), "{said}");
    assert_eq!(std::fs::read(&out).expect("download"), ours);
    let said = cli(&["artifact", "delete", &a_id]);
    assert!(said.contains("deleted"), "{said}");

    let (status, _) = server.get(&format!("/api/v1/artifacts/{a_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(blob_files(&server), vec![b_id.clone()]);
    let actions = server.audit_actions(&a_id).await;
    assert!(
        actions.contains(&"artifact.uploaded".to_owned())
            && actions.contains(&"artifact.deleted".to_owned()),
        "{actions:?}"
    );
    // Deleted: its name is free again for its device types.
    let (status, body) = upload(&server, ours, "").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Runs the `atrium` binary against the server and returns its standard output.
pub(crate) fn atrium_cli(server: &TestServer) -> impl Fn(&[&str]) -> String {
    let bin = std::env::var("CARGO_BIN_EXE_atrium")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            // The e2e crate has no binary of its own: use the workspace's build of `atrium`.
            let mut p = std::env::current_exe().expect("test binary");
            p.pop();
            if p.ends_with("deps") {
                p.pop();
            }
            p.join("atrium")
        });
    let api = server.api_url();
    let token = server.token.clone();
    let ca = server.ca_file();
    move |args| {
        let out = Command::new(&bin)
            .args(args)
            .env("ATRIUM_SERVER", &api)
            .env("ATRIUM_TOKEN", &token)
            .env("ATRIUM_CA_FILE", &ca)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} ({e}): build it with cargo build -p atrium",
                    bin.display()
                )
            });
        assert!(
            out.status.success(),
            "atrium {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_uploads_only_when_keys_are_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("release.key");
    let public = dir.path().join("release.pub.pem");
    let other = dir.path().join("other.key");
    for k in [&key, &other] {
        run_ok(
            "openssl",
            &[
                "ecparam",
                "-genkey",
                "-name",
                "prime256v1",
                "-noout",
                "-out",
                s(k),
            ],
        );
    }
    run_ok(
        "openssl",
        &["ec", "-in", s(&key), "-pubout", "-out", s(&public)],
    );
    let signing = SigningKey::from_pem(&std::fs::read(&key).expect("key")).expect("key");
    let wrong = SigningKey::from_pem(&std::fs::read(&other).expect("key")).expect("key");
    let public_for_server = public.clone();
    let server = TestServer::start_with(Backend::Sqlite, move |c| {
        c.artifact_verify_keys = vec![public_for_server];
    })
    .await;
    let image = payload(dir.path(), 200_000);

    let unsigned = atrium_artifact(dir.path(), "r1", &["pi4"], &image, None);
    let (status, body) = upload(&server, unsigned, "").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("not signed"),
        "{body}"
    );

    let wrongly = atrium_artifact(dir.path(), "r1", &["pi4"], &image, Some(&wrong));
    let (status, body) = upload(&server, wrongly, "").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("signature"),
        "{body}"
    );

    // Signed by Debian's mender-artifact with the right key.
    let signed_path = dir.path().join("signed.mender");
    run_ok(
        "mender-artifact",
        &[
            "write",
            "rootfs-image",
            "-n",
            "r1",
            "-t",
            "pi4",
            "-f",
            s(&image),
            "-k",
            s(&key),
            "-o",
            s(&signed_path),
        ],
    );
    let (status, body) = upload(&server, std::fs::read(&signed_path).expect("signed"), "").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["signed"], true);
    assert_eq!(body["verified_key"], "release.pub.pem");
    let signed = atrium_artifact(dir.path(), "r2", &["pi4"], &image, Some(&signing));
    let (status, body) = upload(&server, signed, "").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(blob_files(&server).len(), 2, "refused uploads left nothing");

    // Over the size limit: 413, and nothing is stored.
    let small = TestServer::start_with(Backend::Sqlite, |c| c.artifact_max_bytes = 100_000).await;
    let big = atrium_artifact(dir.path(), "r3", &["pi4"], &image, None);
    let (status, body) = upload(&small, big, "").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(blob_files(&small).is_empty());
}

/// One HTTP/1.1 exchange on an open connection: the status and body of the answer.
async fn exchange<S>(conn: &mut S, head: &str, body: &[u8]) -> (u16, Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    conn.write_all(head.as_bytes()).await.expect("request head");
    conn.write_all(body).await.expect("request body");
    conn.flush().await.expect("flush");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.expect("answer");
        assert!(
            n > 0,
            "the server closed the connection instead of answering"
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut rest = buf[end..].to_vec();
    rest.resize(length, 0);
    let have = buf.len() - end;
    conn.read_exact(&mut rest[have..])
        .await
        .expect("answer body");
    (status, serde_json::from_slice(&rest).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_is_read_to_its_end_and_the_connection_stays_open() {
    let server = TestServer::start_with(Backend::Sqlite, |c| c.artifact_max_bytes = 100_000).await;
    let tcp = tokio::net::TcpStream::connect(server.config.api_listen)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = tokio_rustls::TlsConnector::from(server.tls())
        .connect(name, tcp)
        .await
        .expect("TLS");
    let post = |content_type: &str, len: usize| {
        format!(
            "POST /api/v1/artifacts HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\
             content-type: {content_type}\r\ncontent-length: {len}\r\n\r\n",
            server.token
        )
    };
    // Over the limit by its declared length, wrong content type, not an artifact: each is
    // answered after the whole body was read, and the next request takes the same connection.
    let big = vec![0x5a; 1 << 20];
    let (status, body) = exchange(&mut conn, &post(MEDIA, big.len()), &big).await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = exchange(&mut conn, &post("text/plain", big.len()), &big).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = exchange(&mut conn, &post(MEDIA, 90_000), &big[..90_000]).await;
    assert_eq!(status, 422, "{body}");
    let list = format!(
        "GET /api/v1/artifacts HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\r\n",
        server.token
    );
    let (status, body) = exchange(&mut conn, &list, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(blob_files(&server).is_empty());
}

/// Keeps an artifact's payload files.
#[derive(Default)]
struct Keep(Vec<Vec<u8>>);

impl atrium_artifact::PayloadSink for Keep {
    fn file(
        &mut self,
        _file: &atrium_artifact::PayloadFile,
        data: &mut dyn std::io::Read,
    ) -> Result<(), atrium_artifact::BoxError> {
        let mut content = Vec::new();
        data.read_to_end(&mut content)?;
        self.0.push(content);
        Ok(())
    }
}

async fn deltas_made_by_the_server(backend: Backend) {
    let server = TestServer::start(backend).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = payload(dir.path(), 2 << 20);
    let old = std::fs::read(&image).expect("old image");
    let full_1 = atrium_artifact(dir.path(), "release-1", &["pi4", "pi5"], &image, None);
    let mut new = old.clone();
    new[300_000..310_000].fill(0x5a);
    new.extend_from_slice(&old[..50_000]);
    std::fs::write(&image, &new).expect("new image");
    let full_2 = atrium_artifact(dir.path(), "release-2", &["pi5"], &image, None);
    let (status, a) = upload(&server, full_1, "").await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    let (status, b) = upload(&server, full_2.clone(), "").await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    let (a_id, b_id) = (a["id"].as_str().expect("id"), b["id"].as_str().expect("id"));

    let post = |path: String| {
        let request = server
            .http()
            .post(format!("{}{path}", server.api_url()))
            .bearer_auth(&server.token);
        async move {
            let response = request.send().await.expect("post");
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    // Made through the CLI (`atrium artifact make-delta`, the REST call underneath).
    let cli = atrium_cli(&server);
    let said = cli(&[
        "artifact",
        "make-delta",
        b_id,
        "--from",
        a_id,
        "--level",
        "3",
        "--json",
    ]);
    let d: Value = serde_json::from_str(&said).expect("json");
    let d_id = d["id"].as_str().expect("id").to_owned();
    // Beside the full release-2, under the same name: it depends on release-1's image.
    assert_eq!(d["name"], "release-2");
    assert_eq!(d["device_types"], serde_json::json!(["pi5"]));
    assert_eq!(
        d["payload_types"],
        serde_json::json!(["rootfs-image-delta"])
    );
    assert_eq!(d["depends"]["rootfs-image.checksum"], sha256(&old));
    assert_eq!(d["provides"]["rootfs-image.checksum"], sha256(&new));
    assert_eq!(d["signed"], false);
    let size = d["size"].as_i64().expect("size");
    assert!(
        size < full_2.len() as i64 / 10,
        "delta {size} bytes, full {}",
        full_2.len()
    );
    let actions = server.audit_actions(&d_id).await;
    assert_eq!(actions, ["artifact.delta_created"], "{actions:?}");

    // Downloaded and applied to release-1's image, it makes release-2's.
    let bytes = server
        .http()
        .get(format!(
            "{}/api/v1/artifacts/{d_id}/download",
            server.api_url()
        ))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("download")
        .bytes()
        .await
        .expect("body");
    let mut keep = Keep::default();
    let read = atrium_artifact::read(
        &bytes[..],
        &atrium_artifact::ReadOptions::default(),
        &mut keep,
    )
    .expect("the delta reads");
    let meta = atrium_artifact::delta::DeltaMeta::from_meta_data(
        read.header.payloads[0].meta_data.as_ref(),
    )
    .expect("meta-data");
    let mut made = Vec::new();
    atrium_artifact::delta::apply_patch(&old, &mut &keep.0[0][..], &meta, &mut made)
        .expect("applies");
    assert!(made == new, "the server's delta does not make release-2");

    // The same delta again: a conflict, and nothing is left of it.
    let blobs = blob_files(&server);
    let (status, body) = post(format!(
        "/api/v1/artifacts/{b_id}/delta?from={a_id}&level=3"
    ))
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(blob_files(&server), blobs);
    // A delta is no source, the same artifact twice is no delta, unknown ids are 404.
    let (status, body) = post(format!("/api/v1/artifacts/{b_id}/delta?from={d_id}")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = post(format!("/api/v1/artifacts/{b_id}/delta?from={b_id}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(format!("/api/v1/artifacts/{b_id}/delta?from=nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(blob_files(&server), blobs);
}
