//! bollard's parsing of the answers vmoat relies on, against a fake Docker API the test serves
//! on a unix socket (`/_ping`, `/containers/json`, `/containers/<id>/json`). The real daemon is
//! exercised in the VM tier.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use vmoat_docker::{DockerClient, DockerError, Health, Protocol, PublishedPort};

/// `GET /containers/json` of a daemon without the `Health` field (API < 1.52): health comes
/// from the status text. Ports as Docker lists them: once per address family.
const LIST: &str = r#"[
  {"Id":"bbb","Names":["/web-1"],"Image":"nginx:1.27","ImageID":"sha256:1","Command":"nginx",
   "Created":1,"State":"running","Status":"Up 3 minutes (healthy)",
   "Ports":[{"IP":"0.0.0.0","PrivatePort":80,"PublicPort":8080,"Type":"tcp"},
            {"IP":"::","PrivatePort":80,"PublicPort":8080,"Type":"tcp"},
            {"IP":"127.0.0.1","PrivatePort":5432,"PublicPort":15432,"Type":"tcp"},
            {"IP":"0.0.0.0","PrivatePort":53,"PublicPort":5353,"Type":"udp"},
            {"PrivatePort":9000,"Type":"tcp"}],
   "Labels":{},"HostConfig":{"NetworkMode":"bridge"},"NetworkSettings":{"Networks":{}},
   "Mounts":[]},
  {"Id":"aaa","Names":["/db-1"],"Image":"postgres:17","ImageID":"sha256:2","Command":"pg",
   "Created":2,"State":"running","Status":"Up 2 seconds (health: starting)",
   "Health":{"Status":"starting","FailingStreak":0},
   "Ports":[{"IP":"0.0.0.0","PrivatePort":5432,"PublicPort":8080,"Type":"tcp"}],
   "Labels":{},"HostConfig":{"NetworkMode":"bridge"},"NetworkSettings":{"Networks":{}},
   "Mounts":[]},
  {"Id":"ccc","Names":["/plain"],"Image":"busybox","ImageID":"sha256:3","Command":"sh",
   "Created":3,"State":"running","Status":"Up 1 hour","Ports":[],
   "Labels":{},"HostConfig":{"NetworkMode":"bridge"},"NetworkSettings":{"Networks":{}},
   "Mounts":[]}
]"#;

/// `GET /containers/bbb/json`, trimmed to what matters.
const INSPECT: &str = r#"{
  "Id":"bbb","Name":"/web-1","Image":"sha256:1",
  "State":{"Status":"running","Running":true,"Paused":false,"Restarting":false,
           "OOMKilled":false,"Dead":false,"Pid":42,"ExitCode":0,"Error":"",
           "StartedAt":"2026-12-04T10:00:00Z","FinishedAt":"0001-01-01T00:00:00Z",
           "Health":{"Status":"unhealthy","FailingStreak":3,"Log":[]}},
  "Config":{"Image":"nginx:1.27"},
  "NetworkSettings":{"Ports":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"8080"},
                                        {"HostIp":"::","HostPort":"8080"}],
                              "443/tcp":null,
                              "53/udp":[{"HostIp":"0.0.0.0","HostPort":"5353"}]}}
}"#;

/// A fake daemon on a unix socket; records the paths it was asked for.
struct FakeDocker {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    paths: Arc<Mutex<Vec<String>>>,
}

async fn answer(
    req: Request<Incoming>,
    paths: Arc<Mutex<Vec<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let uri = req.uri().to_string();
    paths.lock().unwrap().push(uri.clone());
    // Accept versioned and unversioned paths alike, as dockerd does.
    let path = req.uri().path();
    let path = match path.strip_prefix("/v1.") {
        Some(rest) => rest.find('/').map_or(path, |i| &rest[i..]),
        None => path,
    };
    let (status, content_type, body) = match path {
        "/_ping" => (200, "text/plain", "OK"),
        "/containers/json" => (200, "application/json", LIST),
        "/containers/bbb/json" => (200, "application/json", INSPECT),
        _ => (
            404,
            "application/json",
            r#"{"message":"No such container"}"#,
        ),
    };
    let response = Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Api-Version", "1.45")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    Ok(response)
}

impl FakeDocker {
    async fn start() -> FakeDocker {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::clone(&paths);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let paths = Arc::clone(&served);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| answer(req, Arc::clone(&paths)));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), service)
                        .await;
                });
            }
        });
        FakeDocker {
            _dir: dir,
            socket,
            paths,
        }
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

fn port(host_port: u16, container_port: u16, protocol: Protocol, ip: &str) -> PublishedPort {
    PublishedPort {
        host_port,
        container_port,
        protocol,
        host_ip: ip.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_containers_and_published_ports() {
    let fake = FakeDocker::start().await;
    let client = DockerClient::connect(&fake.socket).unwrap();
    client.ping().await.unwrap();

    let containers = client.containers().await.unwrap();
    let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["db-1", "plain", "web-1"]);

    let web = &containers[2];
    assert_eq!(web.id, "bbb");
    assert_eq!(web.image, "nginx:1.27");
    assert_eq!(web.state, "running");
    assert_eq!(web.health, Some(Health::Healthy));
    assert_eq!(
        web.ports,
        [
            port(5353, 53, Protocol::Udp, "0.0.0.0"),
            port(8080, 80, Protocol::Tcp, "0.0.0.0"),
            port(15432, 5432, Protocol::Tcp, "127.0.0.1"),
        ]
    );
    assert_eq!(containers[0].health, Some(Health::Starting));
    assert_eq!(containers[1].health, None);
    assert!(containers[1].ports.is_empty());

    // TCP only, each VM port once, sorted.
    assert_eq!(client.published_ports().await.unwrap(), [8080, 15432]);

    // Only running containers were asked for.
    let paths = fake.paths();
    let list = paths
        .iter()
        .find(|p| p.contains("/containers/json"))
        .unwrap();
    assert!(!list.contains("all=true"), "{list}");

    // Unversioned paths: the daemon answers at its own API version, so a client newer than
    // the daemon (bollard speaks 1.53, Debian's docker 26 tops out at 1.45) still works.
    assert!(paths.iter().all(|p| !p.starts_with("/v1.")), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_gives_state_health_and_ports() {
    let fake = FakeDocker::start().await;
    let client = DockerClient::connect(&fake.socket).unwrap();

    let web = client.container("bbb").await.unwrap();
    assert_eq!(web.name, "web-1");
    assert_eq!(web.image, "nginx:1.27");
    assert_eq!(web.state, "running");
    assert_eq!(web.health, Some(Health::Unhealthy));
    assert_eq!(
        web.ports,
        [
            port(5353, 53, Protocol::Udp, "0.0.0.0"),
            port(8080, 80, Protocol::Tcp, "0.0.0.0")
        ]
    );

    let err = client.container("missing").await.unwrap_err();
    assert!(matches!(err, DockerError::Api { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/containers/missing/json"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_never_redirects_the_client() {
    let fake = FakeDocker::start().await;
    // SAFETY: the only test in this binary touching these variables; bollard only reads them
    // in its `*_defaults` constructors, which vmoat never calls.
    unsafe {
        std::env::set_var("DOCKER_HOST", "unix:///nonexistent/elsewhere.sock");
        std::env::set_var("DOCKER_CONTEXT", "somewhere-else");
    }
    let client = DockerClient::connect(&fake.socket).unwrap();
    client.ping().await.unwrap();
    assert_eq!(client.socket(), fake.socket.as_path());
    assert!(fake.paths().iter().any(|p| p.ends_with("/_ping")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_socket_is_an_api_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let client = DockerClient::connect(&socket).unwrap();
    let err = client.ping().await.unwrap_err();
    assert!(matches!(err, DockerError::Api { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&socket.display().to_string()),
        "{err}"
    );
    assert!(Path::new(&socket).exists());
}
