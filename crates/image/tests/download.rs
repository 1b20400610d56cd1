//! Downloads of Colima-style `.raw.gz` images from a local HTTP server on 127.0.0.1: the good
//! path, checksum mismatch, a transfer cut off halfway and resumed, 404, redirects, two
//! fetches at once, a checksum file instead of a catalog digest, and corrupted cache files.

#[path = "support/server.rs"]
mod server;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use server::{Reply, Server, gz_disk, sha512_hex};
use vmoat_driver::Arch;
use vmoat_image::download::{FetchRequest, Fetcher, Outcome};
use vmoat_image::{
    Catalog, DiskFormat, ImageCache, ImageError, Progress, ResolvedImage, lima_entry_dir,
};

/// A temp dir holding vmoat's cache and a Lima download cache.
struct Dirs {
    tmp: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        Dirs {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    fn cache(&self) -> PathBuf {
        self.tmp.path().join("vmoat")
    }
    fn lima(&self) -> PathBuf {
        self.tmp.path().join("lima/download")
    }
    fn image_cache(&self) -> ImageCache {
        ImageCache::new(&self.cache(), &self.lima())
    }
}

/// Ensures Colima's x86_64 image from `catalog` in the caches of `dirs`, quietly.
async fn ensure(dirs: &Dirs, catalog: &Catalog) -> Result<ResolvedImage, ImageError> {
    dirs.image_cache()
        .ensure_colima(catalog, Arch::X86_64, &Progress::hidden())
        .await
}

fn catalog(url: &str, sha512: &str) -> Catalog {
    Catalog::parse(&format!("amd64 docker {url} {sha512}\n"), "test").unwrap()
}

/// Files in a directory tree, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_good_image_lands_in_lima_layout_and_unpacked_in_vmoat_cache() {
    let (raw, gz) = gz_disk(3 << 20, 1);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();

    let image = ensure(&dirs, &catalog(&url, &sha512_hex(&gz)))
        .await
        .unwrap();

    // vmoat's copy: unpacked, raw, sparse, byte-identical.
    assert_eq!(image.format, DiskFormat::Raw);
    assert_eq!(fs::read(&image.disk).unwrap(), raw);
    assert_eq!(image.digest, format!("sha512:{}", sha512_hex(&gz)));
    assert!(image.kernel.is_none());

    // Lima's copy: compressed data plus url, digest and header files.
    let entry = lima_entry_dir(&dirs.lima(), &url);
    assert_eq!(fs::read(entry.join("data")).unwrap(), gz);
    assert_eq!(fs::read_to_string(entry.join("url")).unwrap(), url);
    assert_eq!(
        fs::read_to_string(entry.join("sha512.digest")).unwrap(),
        format!("sha512:{}", sha512_hex(&gz))
    );
    assert_eq!(
        fs::read_to_string(entry.join("type")).unwrap(),
        "application/gzip"
    );
    assert!(!entry.join("data.part").exists());

    // A second ensure is a cache hit: no new request.
    let again = ensure(&dirs, &catalog(&url, &sha512_hex(&gz)))
        .await
        .unwrap();
    assert_eq!(again, image);
    assert_eq!(server.gets("/img.raw.gz").len(), 1);
}

#[tokio::test]
async fn a_wrong_checksum_fails_and_leaves_nothing_trusted() {
    let (_, gz) = gz_disk(1 << 20, 2);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();
    let wrong = sha512_hex(b"some other file");

    let err = ensure(&dirs, &catalog(&url, &wrong)).await.unwrap_err();
    assert!(err.is_download_failure());
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");

    // No data, no partial, no digest in Lima's entry; no image or staging dir in vmoat's.
    let entry = lima_entry_dir(&dirs.lima(), &url);
    let left = tree(&entry);
    for trusted in ["data", "data.part", "sha512.digest", "vmoat-verified.json"] {
        assert!(
            !left.contains(&trusted.to_owned()),
            "{trusted} left: {left:?}"
        );
    }
    let images = tree(&dirs.cache().join("images"));
    assert!(
        images.iter().all(|f| f.starts_with(".locks/")),
        "left in vmoat's cache: {images:?}"
    );
}

#[tokio::test]
async fn a_transfer_cut_off_halfway_resumes_on_the_next_run() {
    let (raw, gz) = gz_disk(4 << 20, 3);
    let server = Server::start();
    let half = gz.len() / 2;
    server.route(
        "/img.raw.gz",
        Reply::CutOff {
            body: gz.clone(),
            sent: half,
        },
    );
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();
    let cat = catalog(&url, &sha512_hex(&gz));

    let err = ensure(&dirs, &cat).await.unwrap_err();
    assert!(matches!(err, ImageError::Interrupted { .. }), "{err:?}");
    assert!(err.is_download_failure());
    let entry = lima_entry_dir(&dirs.lima(), &url);
    assert!(
        !entry.join("data").exists(),
        "a cut-off download must not become data"
    );
    assert!(!entry.join("sha512.digest").exists());

    // The server is back: the second run asks only for the rest.
    let image = ensure(&dirs, &cat).await.unwrap();
    assert_eq!(fs::read(&image.disk).unwrap(), raw);
    let gets = server.gets("/img.raw.gz");
    assert_eq!(gets.len(), 2, "{gets:?}");
    let resumed_at: usize = gets[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .expect("second request is a range request");
    assert!(
        resumed_at > 0 && resumed_at <= half,
        "resumed at {resumed_at}"
    );
    assert_eq!(gets[1].status, 206);
    assert_eq!(fs::read(entry.join("data")).unwrap(), gz);
}

#[tokio::test]
async fn a_404_is_a_download_failure_naming_the_url() {
    let server = Server::start();
    let url = server.url("/missing.raw.gz");
    let dirs = Dirs::new();

    let err = ensure(&dirs, &catalog(&url, &sha512_hex(b"x")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    assert!(err.is_download_failure());
    assert!(err.to_string().contains("/missing.raw.gz"), "{err}");
    let left = tree(&lima_entry_dir(&dirs.lima(), &url));
    assert!(
        !left
            .iter()
            .any(|f| f.starts_with("data") || f.ends_with(".digest")),
        "{left:?}"
    );
}

#[tokio::test]
async fn redirects_are_followed_and_cached_under_the_requested_url() {
    let (raw, gz) = gz_disk(1 << 20, 4);
    let server = Server::start();
    server.route(
        "/releases/img.raw.gz",
        Reply::Redirect("/cdn/blob".to_owned()),
    );
    server.route("/cdn/blob", Reply::File(gz.clone()));
    let url = server.url("/releases/img.raw.gz");
    let dirs = Dirs::new();

    let image = ensure(&dirs, &catalog(&url, &sha512_hex(&gz)))
        .await
        .unwrap();
    assert_eq!(fs::read(&image.disk).unwrap(), raw);
    assert_eq!(server.gets("/releases/img.raw.gz").len(), 1);
    assert_eq!(server.gets("/cdn/blob").len(), 1);
    assert!(lima_entry_dir(&dirs.lima(), &url).join("data").is_file());
}

#[tokio::test]
async fn two_fetches_of_one_url_at_once_transfer_it_once() {
    let (raw, gz) = gz_disk(2 << 20, 5);
    let server = Server::start();
    // Slow enough (about half a second) that the second fetch surely waits on the lock.
    server.route(
        "/img.raw.gz",
        Reply::Slow {
            body: gz.clone(),
            chunk: 64 * 1024,
            pause: Duration::from_millis(15),
        },
    );
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();
    let cat = catalog(&url, &sha512_hex(&gz));
    let (a, b) = (dirs.image_cache(), dirs.image_cache());
    let progress = Progress::hidden();

    let (first, second) = tokio::join!(
        a.ensure_colima(&cat, Arch::X86_64, &progress),
        b.ensure_colima(&cat, Arch::X86_64, &progress)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first, second);
    assert_eq!(fs::read(&first.disk).unwrap(), raw);
    assert_eq!(server.gets("/img.raw.gz").len(), 1, "{:?}", server.seen());

    // The same holds for the Lima-level fetch alone (no vmoat image lock involved).
    let lima_only = dirs.tmp.path().join("lima2");
    let (f1, f2) = (Fetcher::new(&lima_only), Fetcher::new(&lima_only));
    let request = FetchRequest {
        url: &url,
        sha512: Some(&sha512_hex(&gz)),
        unpack_to: None,
    };
    let (r1, r2) = tokio::join!(f1.fetch(request, &progress), f2.fetch(request, &progress));
    let outcomes = [r1.unwrap().outcome, r2.unwrap().outcome];
    assert_eq!(server.gets("/img.raw.gz").len(), 2);
    assert!(outcomes.contains(&Outcome::Cached), "{outcomes:?}");
}

#[tokio::test]
async fn the_checksum_file_is_used_when_the_catalog_has_no_digest() {
    let (raw, gz) = gz_disk(1 << 20, 6);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    let sum = format!("{}  img.raw.gz\n", sha512_hex(&gz));
    server.route("/img.raw.gz.sha512sum", Reply::File(sum.into_bytes()));
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();

    let image = ensure(&dirs, &catalog(&url, "-")).await.unwrap();
    assert_eq!(fs::read(&image.disk).unwrap(), raw);

    // A checksum file that holds garbage is refused.
    server.route("/bad.raw.gz", Reply::File(gz.clone()));
    server.route(
        "/bad.raw.gz.sha512sum",
        Reply::File(b"<html>oops</html>".to_vec()),
    );
    let err = ensure(&dirs, &catalog(&server.url("/bad.raw.gz"), "-"))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::ChecksumFile { .. }), "{err:?}");
}

#[tokio::test]
async fn corrupted_cache_files_are_caught_and_replaced_never_used() {
    let (raw, gz) = gz_disk(2 << 20, 7);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();
    let cat = catalog(&url, &sha512_hex(&gz));

    let image = ensure(&dirs, &cat).await.unwrap();

    // 1. The unpacked disk is damaged: rebuilt from Lima's verified copy, no new download.
    let mut bytes = fs::read(&image.disk).unwrap();
    bytes[100_000] ^= 0xff;
    fs::write(&image.disk, &bytes).unwrap();
    let again = ensure(&dirs, &cat).await.unwrap();
    assert_eq!(fs::read(&again.disk).unwrap(), raw);
    assert_eq!(server.gets("/img.raw.gz").len(), 1);

    // 2. Lima's copy is replaced by garbage of the same size and vmoat's image is gone:
    //    the garbage is detected by its digest and fetched again.
    let data = lima_entry_dir(&dirs.lima(), &url).join("data");
    fs::write(&data, vec![0x42u8; gz.len()]).unwrap();
    fs::remove_dir_all(dirs.cache().join("images").join(&image.name)).unwrap();
    let fresh = ensure(&dirs, &cat).await.unwrap();
    assert_eq!(fs::read(&fresh.disk).unwrap(), raw);
    assert_eq!(fs::read(&data).unwrap(), gz);
    assert_eq!(server.gets("/img.raw.gz").len(), 2);
}

#[tokio::test]
async fn no_server_is_an_unreachable_error_suggesting_debian() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/img.raw.gz");
    let dirs = Dirs::new();

    let err = ensure(&dirs, &catalog(&url, &sha512_hex(b"x")))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unreachable { .. }), "{err:?}");
    assert!(err.is_download_failure());
    let text = err.to_string();
    assert!(
        text.contains(&url) && text.contains("VM_IMAGE=debian"),
        "{text}"
    );
}

#[tokio::test]
async fn a_whole_partial_left_by_a_kill_before_the_rename_is_finished_without_refetching() {
    let (_, gz) = gz_disk(1 << 20, 8);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();
    let entry = lima_entry_dir(&dirs.lima(), &url);
    fs::create_dir_all(&entry).unwrap();
    fs::write(entry.join("data.part"), &gz).unwrap();

    let fetched = Fetcher::new(dirs.lima())
        .fetch(
            FetchRequest {
                url: &url,
                sha512: Some(&sha512_hex(&gz)),
                unpack_to: None,
            },
            &Progress::hidden(),
        )
        .await
        .unwrap();
    assert_eq!(fs::read(&fetched.data).unwrap(), gz);
    let gets = server.gets("/img.raw.gz");
    assert_eq!(gets.len(), 1);
    assert_eq!(
        gets[0].status, 416,
        "the resume asked past the end: {gets:?}"
    );
}

#[tokio::test]
async fn a_partial_of_another_version_is_discarded_and_fetched_whole() {
    let (raw, gz) = gz_disk(1 << 20, 9);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();

    // Left over from an older file at this URL: its ETag no longer matches.
    let entry = lima_entry_dir(&dirs.lima(), &url);
    fs::create_dir_all(&entry).unwrap();
    fs::write(entry.join("data.part"), vec![0xeeu8; gz.len() / 3]).unwrap();
    fs::write(entry.join("etag"), "\"older-version\"").unwrap();

    let image = ensure(&dirs, &catalog(&url, &sha512_hex(&gz)))
        .await
        .unwrap();
    assert_eq!(fs::read(&image.disk).unwrap(), raw);
    let gets = server.gets("/img.raw.gz");
    assert_eq!(gets.len(), 1);
    assert!(gets[0].range.is_some(), "a resume was tried: {gets:?}");
    assert_eq!(
        gets[0].status, 200,
        "If-Range made the server send it whole"
    );
}

#[tokio::test]
async fn a_resume_that_does_not_verify_starts_over_once() {
    let (raw, gz) = gz_disk(1 << 20, 10);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    let url = server.url("/img.raw.gz");
    let dirs = Dirs::new();

    // Damaged kept bytes with a validator the server accepts: the resumed file cannot verify.
    let entry = lima_entry_dir(&dirs.lima(), &url);
    fs::create_dir_all(&entry).unwrap();
    fs::write(entry.join("data.part"), vec![0x11u8; gz.len() / 2]).unwrap();
    fs::write(entry.join("etag"), server::etag(&gz)).unwrap();

    let image = ensure(&dirs, &catalog(&url, &sha512_hex(&gz)))
        .await
        .unwrap();
    assert_eq!(fs::read(&image.disk).unwrap(), raw);
    let statuses: Vec<u16> = server
        .gets("/img.raw.gz")
        .iter()
        .map(|g| g.status)
        .collect();
    assert_eq!(statuses, [206, 200]);

    // Without unpacking, the same bad resume is caught by the digest.
    let lima = dirs.tmp.path().join("lima-plain");
    let entry = lima_entry_dir(&lima, &url);
    fs::create_dir_all(&entry).unwrap();
    fs::write(entry.join("data.part"), vec![0x11u8; gz.len() / 2]).unwrap();
    fs::write(entry.join("etag"), server::etag(&gz)).unwrap();
    let request = FetchRequest {
        url: &url,
        sha512: Some(&sha512_hex(&gz)),
        unpack_to: None,
    };
    let fetched = Fetcher::new(&lima)
        .fetch(request, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(fs::read(&fetched.data).unwrap(), gz);
    let statuses: Vec<u16> = server
        .gets("/img.raw.gz")
        .iter()
        .map(|g| g.status)
        .collect();
    assert_eq!(statuses, [206, 200, 206, 200]);
}
