//! `bench-image`: guest image numbers, each against a baseline measured in the same run.
//!
//! 1. Download throughput: vmoat's verified download (stream, sha512, write, Lima layout)
//!    against `curl -o` fetching the same file from the same local HTTP server on 127.0.0.1,
//!    alternating runs; goal: vmoat ≥ 0.9× curl. Then the `.gz` path (download + gunzip into a
//!    sparse raw in one pass) against `curl | gzip -d`.
//! 2. vmoat's Debian image: build time (from its manifest; `--rebuild` builds it now) and
//!    sizes: raw (virtual and used), qcow2, qcow2 compressed (`qemu-img convert -c`), gzip of
//!    the qcow2.
//!
//! Human-readable lines go to stderr, one JSON object per result to stdout.
//!
//! Usage: `bench-image [--size-mib N] [--runs N] [--no-download] [--no-image] [--rebuild]`
#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use vmoat_driver::Arch;
use vmoat_image::download::{FetchRequest, Fetcher};
use vmoat_image::{BuildOptions, ImageCache, Progress};

struct Options {
    size_mib: usize,
    runs: usize,
    download: bool,
    image: bool,
    rebuild: bool,
}

fn parse_args() -> Options {
    let mut options = Options {
        size_mib: 512,
        runs: 3,
        download: true,
        image: true,
        rebuild: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| fail(&format!("{name} takes a number")))
        };
        match arg.as_str() {
            "--size-mib" => options.size_mib = number("--size-mib"),
            "--runs" => options.runs = number("--runs").max(1),
            "--no-download" => options.download = false,
            "--no-image" => options.image = false,
            "--rebuild" => options.rebuild = true,
            other => fail(&format!(
                "unknown argument {other}; usage: bench-image [--size-mib N] [--runs N] \
                 [--no-download] [--no-image] [--rebuild]"
            )),
        }
    }
    options
}

fn fail(message: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "bench-image: {message}");
    std::process::exit(2);
}

fn note(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn main() {
    let options = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    if options.download {
        runtime.block_on(download_bench(&options));
    }
    if options.image {
        runtime.block_on(image_bench(&options));
    }
}

/// Serves `body` for every request on 127.0.0.1 until the process ends; returns the URL.
fn serve(body: Arc<Vec<u8>>, name: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let url = format!("http://{}/{name}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let body = Arc::clone(&body);
            std::thread::spawn(move || answer(stream, &body));
        }
    });
    url
}

fn answer(mut stream: TcpStream, body: &[u8]) {
    // Read the request head (up to the blank line); its content does not matter here.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    for chunk in body.chunks(1 << 20) {
        if stream.write_all(chunk).is_err() {
            return;
        }
    }
}

fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha512_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha512::digest(bytes))
}

fn mib_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Times `curl` on a shell pipeline, in seconds.
fn time_shell(script: &str) -> f64 {
    let started = Instant::now();
    let status = Command::new("bash")
        .args(["-c", script])
        .stdout(Stdio::null())
        .status()
        .expect("run bash");
    assert!(status.success(), "`{script}` failed");
    started.elapsed().as_secs_f64()
}

async fn time_fetch(url: &str, digest: &str, scratch: &Path, unpack: bool) -> f64 {
    let lima = scratch.join("lima");
    let raw = scratch.join("disk.raw");
    let _ = std::fs::remove_dir_all(&lima);
    let _ = std::fs::remove_file(&raw);
    let request = FetchRequest {
        url,
        sha512: Some(digest),
        unpack_to: unpack.then_some(raw.as_path()),
    };
    let started = Instant::now();
    Fetcher::new(&lima)
        .fetch(request, &Progress::hidden())
        .await
        .expect("vmoat download");
    started.elapsed().as_secs_f64()
}

async fn download_bench(options: &Options) {
    let scratch = tempfile::tempdir().expect("temp dir");
    let size = options.size_mib << 20;
    let body = Arc::new(noise(size));
    let started = Instant::now();
    let digest = sha512_hex(&body);
    let sha512_rate = mib_per_s(size, started.elapsed().as_secs_f64());
    let url = serve(Arc::clone(&body), "file.raw");
    let out = scratch.path().join("curl.out");

    let (mut curl, mut vmoat) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let c = time_shell(&format!("curl -sS -o '{}' '{url}'", out.display()));
        let v = time_fetch(&url, &digest, scratch.path(), false).await;
        note(&format!(
            "download run {run}: curl {:.0} MiB/s, vmoat {:.0} MiB/s",
            mib_per_s(size, c),
            mib_per_s(size, v)
        ));
        curl.push(mib_per_s(size, c));
        vmoat.push(mib_per_s(size, v));
    }
    let (c, v) = (median(curl), median(vmoat));
    note(&format!(
        "download {} MiB: curl {c:.0} MiB/s, vmoat {v:.0} MiB/s, ratio {:.2} (goal >= 0.9); \
         sha512 alone on one core: {sha512_rate:.0} MiB/s",
        options.size_mib,
        v / c
    ));
    println!(
        "{}",
        serde_json::json!({"bench": "image.download", "bytes": size, "runs": options.runs,
            "curl_mib_s": round(c), "vmoat_mib_s": round(v), "ratio": round(v / c),
            "sha512_mib_s": round(sha512_rate)})
    );

    // The .gz path: a raw disk of half noise, half zeros, gzipped.
    let mut raw = noise(size / 2);
    raw.resize(size, 0);
    let gz = {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&raw).expect("gzip in memory");
        encoder.finish().expect("gzip in memory")
    };
    drop(raw);
    let gz_digest = sha512_hex(&gz);
    let gz_len = gz.len();
    let gz_url = serve(Arc::new(gz), "file.raw.gz");

    let (mut curl, mut vmoat) = (Vec::new(), Vec::new());
    for _ in 0..options.runs {
        curl.push(time_shell(&format!(
            "curl -sS '{gz_url}' | gzip -dc > '{}'",
            out.display()
        )));
        vmoat.push(time_fetch(&gz_url, &gz_digest, scratch.path(), true).await);
    }
    let (c, v) = (median(curl), median(vmoat));
    note(&format!(
        "download+gunzip {} MiB gz ({} MiB raw): curl|gzip {c:.2} s, vmoat {v:.2} s \
         (vmoat also keeps the .gz and checks sha512), ratio {:.2}",
        gz_len >> 20,
        options.size_mib,
        c / v
    ));
    println!(
        "{}",
        serde_json::json!({"bench": "image.download_gunzip", "gz_bytes": gz_len,
            "raw_bytes": size, "curl_gzip_s": round(c), "vmoat_s": round(v),
            "ratio": round(c / v)})
    );
}

async fn image_bench(options: &Options) {
    let cache = ImageCache::from_env();
    let arch = Arch::host();
    let build = BuildOptions {
        force: options.rebuild,
        ..BuildOptions::default()
    };
    let started = Instant::now();
    let image = cache
        .ensure_debian(arch, &build, &Progress::stderr())
        .await
        .unwrap_or_else(|e| fail(&format!("debian image: {e}")));
    let ensure_s = started.elapsed().as_secs_f64();
    let manifest = cache
        .store()
        .manifest(&image.name)
        .ok()
        .flatten()
        .unwrap_or_else(|| fail("the built image has no manifest"));
    let sizes = manifest.sizes.clone().unwrap_or_default();

    let scratch = tempfile::tempdir().expect("temp dir");
    let compressed = scratch.path().join("c.qcow2");
    let started = Instant::now();
    let status = Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&image.disk)
        .arg(&compressed)
        .status()
        .expect("run qemu-img");
    assert!(status.success(), "qemu-img convert -c failed");
    let compress_s = started.elapsed().as_secs_f64();
    let qcow2_c = std::fs::metadata(&compressed).map(|m| m.len()).unwrap_or(0);

    let started = Instant::now();
    let gz_len = gzip_len(&image.disk);
    let gzip_s = started.elapsed().as_secs_f64();

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    note(&format!(
        "debian image {}: build {:.0} s (this run: {ensure_s:.1} s{}), raw {:.0} MiB \
         ({:.0} MiB used), qcow2 {:.0} MiB, qcow2 -c {:.0} MiB ({compress_s:.0} s), \
         qcow2.gz {:.0} MiB ({gzip_s:.0} s)",
        image.name,
        manifest.build_seconds.unwrap_or(0.0),
        if ensure_s < 1.0 { ", cache hit" } else { "" },
        mib(sizes.raw),
        mib(sizes.raw_used),
        mib(sizes.qcow2),
        mib(qcow2_c),
        mib(gz_len)
    ));
    println!(
        "{}",
        serde_json::json!({"bench": "image.debian", "name": image.name,
            "build_s": manifest.build_seconds, "ensure_s": round(ensure_s),
            "raw_bytes": sizes.raw, "raw_used_bytes": sizes.raw_used,
            "qcow2_bytes": sizes.qcow2, "qcow2_compressed_bytes": qcow2_c,
            "qcow2_gz_bytes": gz_len, "qcow2_compress_s": round(compress_s),
            "gzip_s": round(gzip_s)})
    );
}

/// Size of the gzip (default level) of a file, streamed; nothing is written.
fn gzip_len(path: &Path) -> u64 {
    struct Counter(u64);
    impl Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut input = std::fs::File::open(path).expect("open image");
    let mut encoder = flate2::write::GzEncoder::new(Counter(0), flate2::Compression::default());
    std::io::copy(&mut input, &mut encoder).expect("gzip image");
    encoder.finish().expect("gzip image").0
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
