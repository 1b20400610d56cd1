//! Issues 5 and 6 end to end on two VMs: two linked worktrees of one repository made from
//! `examples/hello-compose`, brought up at once, each with its compose stack on guest port
//! 8080. Worktree A keeps the example's `EXPOSE_PORTS=(8080)`; worktree B empties it in its
//! `vmoat.local.conf`, so its tunnel discovers the published port through the Docker API,
//! and serves its own edited `index.html`.
//!
//! The two VMs are one [`Shared`] fixture: booted once by whichever test comes first, reused
//! by every test here, destroyed when the test binary ends. Tests that change a worktree's
//! config or its Docker state hold that worktree's lock exclusively; the others share it.
//! About 5-8 minutes on an idle 2-core host under TCG (two boots side by side, two image
//! builds in the guests), much longer on a busy one.
#![cfg(feature = "e2e")]

use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use serde_json::Value;
use vmoat_e2e::{Group, Instance, Outcome, Shared, http};

/// Worktree B's own page.
const B_PAGE: &str = "<!doctype html>\n<title>b</title>\n<h1>hello from worktree b</h1>\n";

/// B's local config: no EXPOSE_PORTS, so `tunnel` asks Docker for the published ports.
const B_LOCAL: &str = "EXPOSE_PORTS=()\n";

struct Pair {
    group: Group,
    a: Side,
    b: Side,
}

struct Side {
    dir: PathBuf,
    vm: Instance,
    lock: RwLock<()>,
}

impl Side {
    /// Shared use: the VM's config and Docker state stay as they are.
    fn read(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive use: the test changes the config or the Docker state, and puts it back.
    fn write(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }
}

static PAIR: Shared<Pair> = Shared::new();

fn pair() -> &'static Pair {
    PAIR.get(Pair::boot)
}

impl Pair {
    fn boot() -> Pair {
        let group = Group::new("workflow");
        let repo = group.repo("hello-compose", "hc");
        let a = repo.worktree("hc-a");
        let b = repo.worktree("hc-b");
        std::fs::write(b.join("www/index.html"), B_PAGE).unwrap();
        std::fs::write(b.join("vmoat.local.conf"), B_LOCAL).unwrap();

        // `up` in both worktrees at once.
        let (up_a, up_b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| group.vmoat(&a).arg("up").run());
            let b = scope.spawn(|| group.vmoat(&b).arg("up").run());
            (a.join().unwrap(), b.join().unwrap())
        });
        up_a.success();
        up_b.success();

        let side = |dir: PathBuf| Side {
            vm: group.instance(&dir),
            dir,
            lock: RwLock::new(()),
        };
        Pair {
            a: side(a),
            b: side(b),
            group,
        }
    }

    fn vmoat(&self, side: &Side) -> vmoat_e2e::VmoatCmd {
        self.group.vmoat(&side.dir)
    }

    /// `vmoat ssh LINE` in a side's worktree, which must succeed.
    #[track_caller]
    fn ssh(&self, side: &Side, line: &str) -> Outcome {
        self.vmoat(side).args(["ssh", line]).run().success()
    }

    /// The one URL `vmoat tunnel` prints in a side's worktree.
    #[track_caller]
    fn tunnel(&self, side: &Side) -> String {
        let out = self.vmoat(side).arg("tunnel").run().success();
        let lines = out.lines();
        out.expect(lines.len() == 1, "expected exactly one URL");
        lines[0].clone()
    }

    #[track_caller]
    fn status(&self, side: &Side) -> Value {
        self.vmoat(side)
            .args(["status", "--json"])
            .run()
            .success()
            .json()
    }
}

/// The page served at `url` (status 200 required).
#[track_caller]
fn page(url: &str) -> String {
    let response = http::get(url).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(response.status, 200, "GET {url}: {response:?}");
    response.body
}

fn index(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("www/index.html")).unwrap()
}

/// The running containers' IDs in a side's VM.
#[track_caller]
fn running_ids(pair: &Pair, side: &Side) -> Vec<String> {
    let mut ids = pair.ssh(side, "docker ps -q --no-trunc").lines();
    ids.sort();
    ids
}

#[test]
fn two_worktrees_serve_their_own_pages_on_guest_port_8080_through_different_urls() {
    let pair = pair();
    let (_a, _b) = (pair.a.read(), pair.b.read());

    // Inside each VM, port 8080 is that worktree's stack.
    for side in [&pair.a, &pair.b] {
        let seen = pair.ssh(side, "curl -fsS http://127.0.0.1:8080/");
        assert_eq!(
            seen.stdout,
            index(&side.dir),
            "guest port 8080 in {:?}",
            side.dir
        );
        let status = pair.status(side);
        let published: Vec<u64> = status["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["host_port"].as_u64())
            .collect();
        assert_eq!(
            published,
            [8080],
            "published ports in {}: {status:#}",
            side.vm.profile
        );
    }

    let url_a = pair.tunnel(&pair.a);
    let url_b = pair.tunnel(&pair.b);
    assert_ne!(url_a, url_b, "both worktrees got the same host URL");
    assert_eq!(page(&url_a), index(&pair.a.dir));
    assert_eq!(page(&url_b), B_PAGE);

    // An edit on the host is what the worktree's own stack serves, and only there.
    let edited = format!(
        "{}<p>edited {}</p>\n",
        index(&pair.a.dir),
        std::process::id()
    );
    std::fs::write(pair.a.dir.join("www/index.html"), &edited).unwrap();
    assert_eq!(page(&url_a), edited);
    assert_eq!(page(&url_b), B_PAGE);
}

#[test]
fn tunnel_with_no_ports_and_no_expose_ports_discovers_the_stacks_published_port() {
    let pair = pair();
    let _b = pair.b.read();

    let url = pair.tunnel(&pair.b);
    assert_eq!(page(&url), B_PAGE);
    let status = pair.status(&pair.b);
    let tunnels = status["tunnels"].as_array().cloned().unwrap_or_default();
    assert!(
        tunnels
            .iter()
            .any(|t| t["guest_port"] == 8080 && t["url"] == url.as_str()),
        "status does not show the tunnel {url} to guest port 8080: {status:#}"
    );
}

#[test]
fn docker_on_the_host_reaches_each_vm_through_its_context() {
    let pair = pair();
    let (_a, _b) = (pair.a.read(), pair.b.read());
    let docker = which("docker").expect("the docker CLI on the host (apt-get install docker-cli)");

    for (side, own, other) in [
        (&pair.a, "hc-a-web", "hc-b-web"),
        (&pair.b, "hc-b-web", "hc-a-web"),
    ] {
        let name = &side.vm.paths.id;
        // vmoat wrote it where DOCKER_CONFIG says, not in the user's ~/.docker.
        let meta =
            vmoat_docker::context_meta_dir(pair.group.docker_config(), name).join("meta.json");
        let text = std::fs::read_to_string(&meta)
            .unwrap_or_else(|e| panic!("context {name} not in DOCKER_CONFIG ({e})"));
        let sock = side.vm.paths.docker_sock();
        assert!(
            text.contains(&format!("unix://{}", sock.display())),
            "{text}"
        );
        if let Some(home) = std::env::home_dir() {
            let users = vmoat_docker::context_meta_dir(&home.join(".docker"), name);
            assert!(
                !users.exists(),
                "context {name} written to {}",
                users.display()
            );
        }

        let out = std::process::Command::new(&docker)
            .args([
                "--context",
                name,
                "ps",
                "--format",
                "{{.Names}} {{.Status}}",
            ])
            .env("DOCKER_CONFIG", pair.group.docker_config())
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .output()
            .expect("docker runs");
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "docker --context {name} ps failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            listed.contains(own),
            "{own} not in `docker --context {name} ps`: {listed}"
        );
        assert!(
            !listed.contains(other),
            "{other} seen through {name}: {listed}"
        );
    }
}

#[test]
fn bollard_pings_each_forwarded_socket_and_sees_the_published_port() {
    let pair = pair();
    let (_a, _b) = (pair.a.read(), pair.b.read());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    for side in [&pair.a, &pair.b] {
        let sock = side.vm.paths.docker_sock();
        rt.block_on(async {
            let docker = vmoat_docker::DockerClient::connect(&sock)
                .unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
            docker
                .ping()
                .await
                .unwrap_or_else(|e| panic!("ping {}: {e}", sock.display()));
            let ports = docker.published_ports().await.expect("published ports");
            assert_eq!(ports, [8080], "published ports through {}", sock.display());
            let containers = docker.containers().await.expect("containers");
            assert!(
                containers
                    .iter()
                    .any(|c| c.ports.iter().any(|p| p.host_port == 8080)),
                "no container publishes 8080: {containers:?}"
            );
        });
    }
}

#[test]
fn test_exits_zero_and_with_the_test_scripts_own_status() {
    let pair = pair();
    let _a = pair.a.read();

    pair.vmoat(&pair.a)
        .arg("test")
        .run()
        .success()
        .stdout_has("ok: the page contains");
    pair.vmoat(&pair.a)
        .args(["test", "--expect", "text that is not on the page"])
        .run()
        .code_is(3)
        .stderr_has("FAIL");
}

#[test]
fn up_on_a_running_vm_only_reruns_cmd_up_and_the_health_wait() {
    let pair = pair();
    let _a = pair.a.read();
    let pids = pair.a.vm.live_pids();
    let containers = running_ids(pair, &pair.a);

    let out = pair
        .vmoat(&pair.a)
        .arg("up")
        .run()
        .success()
        .stderr_has("docker compose up -d")
        .stderr_has("health:");
    for stage in ["kernel:", "ssh:", "cloud-init:", "created VM"] {
        let booted = out.stderr.contains(stage);
        assert!(
            !booted,
            "`up` on a running VM went through `{stage}`:\n{}",
            out.details()
        );
    }
    assert_eq!(pair.a.vm.live_pids(), pids, "agent and qemu changed");
    assert_eq!(running_ids(pair, &pair.a), containers, "containers changed");
}

#[test]
fn a_health_url_that_never_answers_fails_with_exit_4_after_health_timeout() {
    let pair = pair();
    let _b = pair.b.write();
    let conf = pair.b.dir.join("vmoat.local.conf");
    std::fs::write(
        &conf,
        format!("{B_LOCAL}HEALTH_URL=http://127.0.0.1:8099/\nHEALTH_TIMEOUT=20\n"),
    )
    .unwrap();

    let out = pair.vmoat(&pair.b).arg("up").run();
    std::fs::write(&conf, B_LOCAL).unwrap();

    let out = out.code_is(4).stderr_has("127.0.0.1:8099");
    let health_wait = out.elapsed >= Duration::from_secs(20);
    let out = out.expect(health_wait, "`up` gave up before HEALTH_TIMEOUT=20 s");
    let said = ["refused", "no connection", "error"]
        .iter()
        .any(|e| out.stderr.to_lowercase().contains(e));
    out.expect(said, "the last error seen is not reported");
}

#[test]
fn docker_system_prune_in_one_vm_leaves_the_other_vms_containers_running() {
    let pair = pair();
    let (_a, _b) = (pair.a.write(), pair.b.write());

    // What a prune deletes, in both VMs: a stopped container and its anonymous volume (since
    // Docker 23 a prune keeps named volumes, so only an anonymous one shows it ran).
    let leftovers = "docker create --name vmoat-e2e-stopped -v /vmoat-e2e-data \
                     --entrypoint /bin/busybox $(docker ps --format '{{.Image}}' | head -n 1) \
                     true >/dev/null && \
                     docker inspect -f '{{range .Mounts}}{{.Name}}{{end}}' vmoat-e2e-stopped";
    let volume_a = pair.ssh(&pair.a, leftovers).stdout.trim().to_owned();
    let volume_b = pair.ssh(&pair.b, leftovers).stdout.trim().to_owned();
    let running_a = running_ids(pair, &pair.a);
    assert!(!running_a.is_empty(), "A runs no container");

    pair.ssh(&pair.b, "docker system prune -af --volumes");

    let left = "docker ps -a --format '{{.Names}}' -f name=vmoat-e2e-stopped; \
                docker volume ls -q";
    // B: the prune really ran.
    let b_left = pair.ssh(&pair.b, left).lines();
    assert!(
        !b_left.contains(&"vmoat-e2e-stopped".to_owned()) && !b_left.contains(&volume_b),
        "the prune in B left {b_left:?}"
    );

    // A: untouched.
    assert_eq!(
        running_ids(pair, &pair.a),
        running_a,
        "A's running containers changed"
    );
    let a_left = pair.ssh(&pair.a, left).lines();
    assert!(
        a_left.contains(&"vmoat-e2e-stopped".to_owned()) && a_left.contains(&volume_a),
        "the prune in B removed A's stopped container or volume: {a_left:?}"
    );
    assert!(page(&pair.tunnel(&pair.a)).contains("hello from hello-compose"));
    assert_eq!(
        page(&pair.tunnel(&pair.b)),
        B_PAGE,
        "B's stack kept running too"
    );

    pair.ssh(&pair.a, "docker rm -v vmoat-e2e-stopped >/dev/null");
}

/// The path of `program` on `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
