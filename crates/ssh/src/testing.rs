//! A throwaway OpenSSH server on 127.0.0.1 for tests and benchmarks (feature `test-sshd`).
//!
//! [`SshServer::start`] runs `/usr/sbin/sshd -D -e` with its own host key, config, pid file and
//! `authorized_keys` in a temporary directory, on a free port, and kills it (its whole process
//! group, which it leads) when dropped. The client key is made with [`crate::ensure_user_key`]
//! in the same directory, and the host key is pinned, as vmoat does with a guest.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{PublicKey, Session, SshError, UserKey, ensure_user_key};

/// Where Debian's openssh-server installs the daemon.
pub const SSHD: &str = "/usr/sbin/sshd";

/// How long sshd may take to accept connections (generous: CI hosts are busy).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running sshd, killed on drop.
#[derive(Debug)]
pub struct SshServer {
    dir: tempfile::TempDir,
    child: Child,
    addr: SocketAddr,
    host_key: PublicKey,
    user_key: UserKey,
    user: String,
}

impl SshServer {
    /// Start sshd for the current user. Fails with "install openssh-server" if sshd or
    /// ssh-keygen is missing.
    pub fn start() -> io::Result<SshServer> {
        for tool in [SSHD, "/usr/bin/ssh-keygen"] {
            if !Path::new(tool).exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{tool} not found: install openssh-server (apt-get install openssh-server)"
                    ),
                ));
            }
        }
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd")?;

        let dir = tempfile::Builder::new().prefix("vmoat-sshd").tempdir()?;
        let host_key_path = dir.path().join("host_ed25519");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
            .arg(&host_key_path))?;
        let host_key = std::fs::read_to_string(host_key_path.with_extension("pub"))?;
        let host_key = PublicKey::parse(&host_key).map_err(io::Error::other)?;

        let user_key = ensure_user_key(&dir.path().join("_config")).map_err(io::Error::other)?;
        std::fs::write(
            dir.path().join("authorized_keys"),
            user_key.public_openssh() + "\n",
        )?;
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .ok_or_else(|| io::Error::other("the current uid has no user name"))?;

        // A port picked this way can be taken before sshd binds it; try a few.
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            match spawn_sshd(dir.path(), port) {
                Ok(child) => {
                    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    return Ok(SshServer {
                        dir,
                        child,
                        addr,
                        host_key,
                        user_key,
                        user,
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("sshd did not start")))
    }

    /// The address sshd listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The user to log in as (the current user).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The client key that `authorized_keys` holds.
    pub fn user_key(&self) -> &UserKey {
        &self.user_key
    }

    /// The server's host key, to pin.
    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    /// The server's temporary directory (config, keys, log); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path of the client's private key file.
    pub fn user_key_path(&self) -> PathBuf {
        self.user_key.path().to_owned()
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Connect with the pinned host key and the user key.
    pub async fn connect(&self) -> Result<Session, SshError> {
        Session::connect(
            self.addr,
            &self.user,
            &self.user_key,
            &self.host_key,
            START_TIMEOUT,
        )
        .await
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        // sshd leads its own process group: this ends it and every session it forked.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn run(command: &mut Command) -> io::Result<()> {
    let out = command.output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{:?} failed: {}",
        command,
        String::from_utf8_lossy(&out.stderr)
    )))
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Write the config for `port` and start sshd; wait until it answers with its banner.
///
/// `SetEnv SHLVL=1`: Debian's bash sources `~/.bashrc` for every command sshd runs (it is
/// built with SSH_SOURCE_BASHRC) unless it is a nested shell; the host user's rc files (say, a
/// slow `pyenv init`) are no part of what tests and benches measure.
fn spawn_sshd(dir: &Path, port: u16) -> io::Result<Child> {
    let config = format!(
        "Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {dir}/host_ed25519\n\
         PidFile {dir}/sshd.pid\n\
         AuthorizedKeysFile {dir}/authorized_keys\n\
         StrictModes no\n\
         PermitRootLogin prohibit-password\n\
         UsePAM no\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PubkeyAuthentication yes\n\
         AllowTcpForwarding yes\n\
         AllowStreamLocalForwarding yes\n\
         PermitTTY yes\n\
         X11Forwarding no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         UseDNS no\n\
         MaxSessions 1000\n\
         MaxStartups 1000\n\
         LogLevel ERROR\n\
         SetEnv SHLVL=1\n",
        dir = dir.display()
    );
    let config_path = dir.join("sshd_config");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.join("sshd.log"))?;

    let mut child = Command::new(SSHD)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()?;

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
            return Err(io::Error::other(format!("sshd exited ({status}): {log}")));
        }
        if answers(port) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "sshd did not answer in 60 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether something on `port` sends an SSH banner.
fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut banner = [0u8; 4];
    stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-"
}
