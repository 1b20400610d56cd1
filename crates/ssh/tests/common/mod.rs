//! Helpers shared by the SSH integration tests: the sshd under test, deterministic data, and
//! generous time limits (the machine running them may be busy).

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use sha2::{Digest, Sha256};
use vmoat_ssh::testing::SshServer;

/// The most any single test step may take; generous for a loaded 2-core host.
pub const LIMIT: Duration = Duration::from_secs(600);

/// Start sshd, failing the test with the reason (e.g. "install openssh-server").
pub fn sshd() -> SshServer {
    match SshServer::start() {
        Ok(server) => server,
        Err(e) => panic!("cannot start the test sshd: {e}"),
    }
}

/// Run `fut` with [`LIMIT`], failing the test if it takes longer.
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what} took longer than {LIMIT:?}"),
    }
}

/// A deterministic pseudo-random byte stream (splitmix64), so corruption cannot hide in zeros.
pub struct Noise(u64);

impl Noise {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Noise {
        Noise(seed)
    }

    /// Fill `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }

    /// The first `len` bytes of the stream from `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        Noise::new(seed).fill(&mut buf);
        buf
    }
}

/// Hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
