//! Real Nix (2.8) as the judge of this crate's formats.
//!
//! Builds a closure of test derivations (tests/closure.nix: every kind of file system object,
//! odd names, a 1 MiB file, references) and checks, against `nix-store`, `nix-hash`, `nix copy`
//! and `nix store verify`:
//! - `dump_path` is byte-identical to `nix-store --dump`, for store paths and plain temp dirs;
//! - `NarParser` finds the NarHash/NarSize Nix records and the listing Nix writes to `.ls`;
//! - every narinfo `nix copy --to file://…` writes (several compressions) prints back byte for
//!   byte after parsing, and its `Sig` verifies with our `VerifyingKey`;
//! - narinfos we sign, and a whole binary cache we write by hand, pass `nix store verify` with
//!   our public key and fail with another key; Nix can copy from our hand-made cache.
//!
//! The tests fail when `nix` is missing unless `LARDER_ALLOW_NO_NIX=1`. They never read the
//! host's Nix user config or caches: every Nix call gets fresh XDG dirs and
//! the shared isolated settings of `larder_testkit::nix` (no machine or user nix.conf, no sandbox).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use larder_nix::hash::Sha256;
use larder_nix::nar::dump::dump_path;
use larder_nix::nar::parse::{summarize, NarParser};
use larder_nix::signing::{Signature, SigningKey, VerifyingKey};
use larder_nix::store_path::StorePath;
use larder_nix::{CacheInfo, NarInfo};

/// The shared test settings (larder_testkit::nix), and signatures required.
fn nix_config() -> String {
    format!("{}\nrequire-sigs = true", larder_testkit::nix::NIX_CONFIG)
}

/// Whether to run; panics when Nix is missing unless the user opted out.
fn have_nix() -> bool {
    let ok = larder_testkit::nix::command("nix")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("LARDER_ALLOW_NO_NIX").as_deref() == Ok("1") {
            eprintln!("nix not found: skipping because LARDER_ALLOW_NO_NIX=1");
            return false;
        }
        panic!(
            "`nix` is not installed or not on PATH; set LARDER_ALLOW_NO_NIX=1 to skip these tests"
        );
    }
    true
}

/// Run a Nix command in an isolated environment; returns its output, whatever the status.
fn nix_raw(program: &str, args: &[&str]) -> Output {
    let xdg = tempfile::tempdir().expect("temp dir");
    larder_testkit::nix::command(program)
        .args(args)
        .env("NIX_CONFIG", nix_config())
        .env("XDG_CACHE_HOME", xdg.path().join("cache"))
        .env("XDG_CONFIG_HOME", xdg.path().join("config"))
        .env("XDG_DATA_HOME", xdg.path().join("data"))
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Run a Nix command that must succeed; returns stdout.
fn nix(program: &str, args: &[&str]) -> Vec<u8> {
    let out = nix_raw(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn nix_text(program: &str, args: &[&str]) -> String {
    String::from_utf8(nix(program, args)).expect("utf-8 output")
}

struct Fixture {
    top: String,
    closure: Vec<String>,
    /// Nix-generated key pair and an unrelated one.
    nix_secret_file: PathBuf,
    nix_public: String,
    wrong_public: String,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/closure.nix");
        // A fixed salt: later runs reuse the built paths (the tests only read them).
        let salt = "larder-nix-tests-1";
        let top = nix_text(
            "nix-build",
            &[
                expr.to_str().expect("utf-8 path"),
                "--argstr",
                "salt",
                salt,
                "--no-out-link",
            ],
        )
        .trim()
        .to_owned();
        let closure: Vec<String> = nix_text("nix-store", &["-qR", &top])
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(closure.len(), 7, "closure: {closure:?}");
        let key = |name: &str| {
            let sec = dir.path().join(format!("{name}.sec"));
            let public = dir.path().join(format!("{name}.pub"));
            nix(
                "nix-store",
                &[
                    "--generate-binary-cache-key",
                    name,
                    sec.to_str().expect("utf-8"),
                    public.to_str().expect("utf-8"),
                ],
            );
            (sec, std::fs::read_to_string(public).expect("public key"))
        };
        let (nix_secret_file, nix_public) = key("nix-made-1");
        let (_, wrong_public) = key("nix-wrong-1");
        Fixture {
            top,
            closure,
            nix_secret_file,
            nix_public,
            wrong_public,
            _dir: dir,
        }
    })
}

/// `nix path-info --json` of `paths`, by path.
fn path_infos(paths: &[String], store: Option<&str>) -> BTreeMap<String, serde_json::Value> {
    let mut args = vec!["path-info", "--json"];
    if let Some(s) = store {
        args.extend(["--store", s]);
    }
    args.extend(paths.iter().map(String::as_str));
    let v: serde_json::Value = serde_json::from_slice(&nix("nix", &args)).expect("path-info json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|p| (p["path"].as_str().expect("path").to_owned(), p.clone()))
        .collect()
}

fn check_dump_matches(path: &Path) -> Vec<u8> {
    let theirs = nix("nix-store", &["--dump", path.to_str().expect("utf-8 path")]);
    let ours = dump_path(path, Vec::new()).expect("dump_path");
    assert_eq!(
        ours.len(),
        theirs.len(),
        "NAR length differs for {}",
        path.display()
    );
    assert!(ours == theirs, "NAR bytes differ for {}", path.display());
    let base32 = nix_text(
        "nix-hash",
        &[
            "--type",
            "sha256",
            "--base32",
            path.to_str().expect("utf-8 path"),
        ],
    );
    let summary = summarize(&ours).expect("our parser accepts Nix's NAR");
    assert_eq!(
        summary.nar_hash.to_nix32(),
        base32.trim(),
        "{}",
        path.display()
    );
    assert_eq!(summary.nar_size, ours.len() as u64);
    ours
}

#[test]
fn dump_and_parse_match_nix_for_store_paths() {
    if !have_nix() {
        return;
    }
    let f = fixture();
    let infos = path_infos(&f.closure, None);
    for p in &f.closure {
        let nar = check_dump_matches(Path::new(p));
        // Byte by byte feeding gives the same summary as one chunk.
        let mut parser = NarParser::new();
        for chunk in nar.chunks(7) {
            parser.feed(chunk).expect("feed");
        }
        let s = parser.finish().expect("finish");
        let info = &infos[p];
        let nar_hash = Sha256::parse(info["narHash"].as_str().expect("narHash")).expect("hash");
        assert_eq!(s.nar_hash, nar_hash, "{p}");
        assert_eq!(Some(s.nar_size), info["narSize"].as_u64(), "{p}");
    }
}

#[cfg(unix)]
#[test]
fn dump_matches_nix_for_plain_temp_dirs() {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::{symlink, PermissionsExt as _};

    if !have_nix() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("tree");
    let mk = |rel: &str| root.join(rel);
    std::fs::create_dir_all(mk("sub/deeper/deepest")).expect("mkdir");
    std::fs::create_dir_all(mk("empty")).expect("mkdir");
    std::fs::write(mk("plain"), b"plain\n").expect("write");
    std::fs::write(mk("sub/deeper/deepest/x"), b"x").expect("write");
    std::fs::write(mk("empty-file"), b"").expect("write");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(mk("big"), &big).expect("write");
    for (name, mode) in [
        ("exec-user", 0o700),
        ("exec-group-only", 0o650),
        ("exec-other-only", 0o601),
        ("ro-exec", 0o500),
    ] {
        std::fs::write(mk(name), name.as_bytes()).expect("write");
        std::fs::set_permissions(mk(name), std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    for name in [
        "B", "a", "A", "b", "a.b", "a-b", "a0", "Z", "z", "_", "~", "é", "e\u{301}",
    ] {
        std::fs::write(mk(&format!("order-{name}")), name.as_bytes()).expect("write");
    }
    // A name that is not UTF-8: valid on Linux and in NARs.
    let non_utf8 = std::ffi::OsStr::from_bytes(b"bad-\xff\xfe-name");
    std::fs::write(root.join(non_utf8), b"bytes").expect("write");
    symlink("plain", mk("rel-link")).expect("symlink");
    symlink("/does/not/exist", mk("dangling")).expect("symlink");
    symlink("sub/deeper", mk("dir-link")).expect("symlink");
    symlink(
        std::ffi::OsStr::from_bytes(b"\xff-target"),
        mk("non-utf8-target"),
    )
    .expect("symlink");
    std::fs::set_permissions(mk("sub/deeper"), std::fs::Permissions::from_mode(0o555))
        .expect("chmod");

    check_dump_matches(&root);
    check_dump_matches(&mk("plain"));
    check_dump_matches(&mk("exec-user"));
    check_dump_matches(&mk("empty-file"));
    check_dump_matches(&mk("rel-link"));
    check_dump_matches(&mk("empty"));
    std::fs::set_permissions(mk("sub/deeper"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
}

/// Copy the fixture closure into a fresh file:// cache with `query` options; returns the dir.
fn nix_copy_to_file_cache(f: &Fixture, query: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "file://{}?secret-key={}&write-nar-listing=true&{query}",
        dir.path().display(),
        f.nix_secret_file.display()
    );
    nix("nix", &["copy", "--to", &url, &f.top]);
    dir
}

fn narinfo_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read cache dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .collect();
    v.sort();
    v
}

#[test]
fn narinfos_written_by_nix_copy_roundtrip_and_verify() {
    if !have_nix() {
        return;
    }
    let f = fixture();
    let nix_key = VerifyingKey::parse(&f.nix_public).expect("Nix public key parses");
    assert_eq!(nix_key.to_string(), f.nix_public.trim());
    let wrong_key = VerifyingKey::parse(&f.wrong_public).expect("Nix public key parses");
    let infos = path_infos(&f.closure, None);

    for compression in ["none", "xz", "bzip2", "zstd"] {
        let cache = nix_copy_to_file_cache(f, &format!("compression={compression}"));
        let cache_info_text =
            std::fs::read_to_string(cache.path().join("nix-cache-info")).expect("nix-cache-info");
        let ci = CacheInfo::parse(&cache_info_text).expect("nix-cache-info parses");
        assert_eq!(ci.store_dir, "/nix/store");

        let files = narinfo_files(cache.path());
        assert_eq!(files.len(), f.closure.len(), "{compression}");
        let mut saw_deriver = false;
        let mut saw_refs = false;
        for file in files {
            let text = std::fs::read_to_string(&file).expect("narinfo");
            let ni =
                NarInfo::parse(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", file.display()));
            assert_eq!(
                ni.to_string(),
                text,
                "print(parse(t)) != t for {}",
                file.display()
            );
            assert_eq!(ni.compression, compression);
            assert_eq!(ni.sigs.len(), 1);
            assert!(ni.verify(&nix_key), "Nix's Sig does not verify:\n{text}");
            assert!(nix_key.verify(&ni.fingerprint(), &ni.sigs[0]));
            assert!(!ni.verify(&wrong_key));
            saw_deriver |= ni.deriver.is_some();
            saw_refs |= !ni.references.is_empty();

            let p = ni.store_path.to_absolute();
            let info = &infos[&p];
            assert_eq!(Some(ni.nar_size), info["narSize"].as_u64());
            let want_refs: Vec<&str> = info["references"]
                .as_array()
                .expect("references")
                .iter()
                .map(|r| r.as_str().expect("ref"))
                .collect();
            let got_refs: Vec<String> = ni.references.iter().map(StorePath::to_absolute).collect();
            assert_eq!(got_refs, want_refs);

            // The stored file matches FileHash/FileSize.
            let stored = std::fs::read(cache.path().join(&ni.url)).expect("nar file");
            assert_eq!(ni.file_hash, Some(Sha256::digest(&stored)));
            assert_eq!(ni.file_size, Some(stored.len() as u64));

            // Our parser's view of the NAR equals Nix's: hash, size and the .ls listing.
            let nar = if compression == "none" {
                stored
            } else {
                nix("nix-store", &["--dump", &p])
            };
            let s = summarize(&nar).expect("NAR parses");
            assert_eq!(s.nar_hash, ni.nar_hash);
            assert_eq!(s.nar_size, ni.nar_size);
            let ls = std::fs::read_to_string(
                cache
                    .path()
                    .join(format!("{}.ls", ni.store_path.hash_part())),
            )
            .expect(".ls file");
            let ours = s.listing.to_ls_json();
            let theirs_json: serde_json::Value = serde_json::from_str(&ls).expect(".ls is JSON");
            let ours_json: serde_json::Value =
                serde_json::from_str(&ours).expect("our .ls is JSON");
            assert_eq!(ours_json, theirs_json, "listing differs for {p}");
            assert_eq!(ours, ls, "listing bytes differ for {p}");
        }
        assert!(saw_deriver && saw_refs);
    }
}

/// Replace every narinfo's signatures in `dir` with one by `key`.
fn resign_cache(dir: &Path, key: &SigningKey) {
    for file in narinfo_files(dir) {
        let mut ni = NarInfo::parse(&std::fs::read_to_string(&file).expect("read")).expect("parse");
        ni.sigs.clear();
        ni.sign(key);
        std::fs::write(&file, ni.to_string()).expect("write narinfo");
    }
}

fn nix_verify(store: &str, key: &str, top: &str) -> Output {
    nix_raw(
        "nix",
        &[
            "store",
            "verify",
            "--store",
            store,
            "--trusted-public-keys",
            key.trim(),
            "-r",
            top,
        ],
    )
}

#[test]
fn nix_accepts_our_signatures() {
    if !have_nix() {
        return;
    }
    let f = fixture();
    let ours = SigningKey::from_seed("larder-test-1", [42; 32]).expect("key");
    let our_public = ours.verifying_key().to_string();
    // Our secret key text is what Nix reads too: Nix-signed narinfos verify against the key
    // parsed back from our text, and vice versa below.
    assert_eq!(
        SigningKey::parse(&ours.to_secret_string())
            .expect("parse")
            .verifying_key()
            .to_string(),
        our_public
    );

    let cache = nix_copy_to_file_cache(f, "compression=none");
    let store = format!("file://{}", cache.path().display());
    assert!(
        nix_verify(&store, &f.nix_public, &f.top).status.success(),
        "Nix's own signatures"
    );

    resign_cache(cache.path(), &ours);
    let ok = nix_verify(&store, &our_public, &f.top);
    assert!(
        ok.status.success(),
        "nix store verify rejected our signatures:\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = nix_verify(&store, &f.wrong_public, &f.top);
    assert!(
        !bad.status.success(),
        "nix store verify accepted a wrong key"
    );
    let bad = nix_verify(&store, &f.nix_public, &f.top);
    assert!(
        !bad.status.success(),
        "nix store verify accepted the replaced signer"
    );

    // Nix also accepts a secret key file we wrote: sign with it via nix copy, verify with ours.
    let key_file = cache.path().join("ours.sec");
    std::fs::write(&key_file, ours.to_secret_string()).expect("write key");
    let cache2 = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "file://{}?compression=none&secret-key={}",
        cache2.path().display(),
        key_file.display()
    );
    nix("nix", &["copy", "--to", &url, &f.top]);
    for file in narinfo_files(cache2.path()) {
        let ni = NarInfo::parse(&std::fs::read_to_string(&file).expect("read")).expect("parse");
        assert!(ni.verify(&ours.verifying_key()), "{}", file.display());
    }
}

#[test]
fn nix_reads_a_cache_we_write_by_hand() {
    if !have_nix() {
        return;
    }
    let f = fixture();
    let key = SigningKey::from_seed("larder-hand-1", [9; 32]).expect("key");
    let cache = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(cache.path().join("nar")).expect("mkdir");
    std::fs::write(
        cache.path().join("nix-cache-info"),
        CacheInfo::new(Some(41)).to_string(),
    )
    .expect("write");
    let infos = path_infos(&f.closure, None);
    for p in &f.closure {
        let sp = StorePath::from_absolute(p).expect("store path");
        let nar = dump_path(Path::new(p), Vec::new()).expect("dump");
        let s = summarize(&nar).expect("parse");
        let info = &infos[p];
        let references = info["references"]
            .as_array()
            .expect("refs")
            .iter()
            .map(|r| StorePath::from_absolute(r.as_str().expect("ref")).expect("ref path"))
            .collect();
        let deriver = info["deriver"]
            .as_str()
            .map(|d| StorePath::from_absolute(d).expect("deriver"));
        let file_hash = Sha256::digest(&nar);
        let url = format!("nar/{}.nar", file_hash.to_nix32());
        std::fs::write(cache.path().join(&url), &nar).expect("write nar");
        std::fs::write(
            cache.path().join(format!("{}.ls", sp.hash_part())),
            s.listing.to_ls_json(),
        )
        .expect("write ls");
        let mut ni = NarInfo {
            store_path: sp.clone(),
            url,
            compression: "none".to_owned(),
            file_hash: Some(file_hash),
            file_size: Some(nar.len() as u64),
            nar_hash: s.nar_hash,
            nar_size: s.nar_size,
            references,
            deriver,
            sigs: Vec::new(),
            ca: None,
        };
        ni.sign(&key);
        std::fs::write(
            cache.path().join(format!("{}.narinfo", sp.hash_part())),
            ni.to_string(),
        )
        .expect("write");
    }
    let store = format!("file://{}", cache.path().display());
    let public = key.verifying_key().to_string();
    let ok = nix_verify(&store, &public, &f.top);
    assert!(
        ok.status.success(),
        "nix store verify on our cache:\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!nix_verify(&store, &f.wrong_public, &f.top).status.success());

    // Nix agrees on the metadata, and can substitute the whole closure from our cache.
    let theirs = path_infos(&f.closure, Some(&store));
    for p in &f.closure {
        assert_eq!(
            Sha256::parse(theirs[p]["narHash"].as_str().expect("narHash")).expect("hash"),
            Sha256::parse(infos[p]["narHash"].as_str().expect("narHash")).expect("hash"),
        );
        let sigs: Vec<Signature> = theirs[p]["signatures"]
            .as_array()
            .expect("signatures")
            .iter()
            .map(|s| Signature::parse(s.as_str().expect("sig")).expect("sig parses"))
            .collect();
        assert_eq!(sigs.len(), 1);
    }
    let target = tempfile::tempdir().expect("temp dir");
    let target_store = target.path().join("store");
    nix(
        "nix",
        &[
            "copy",
            "--from",
            &store,
            "--to",
            target_store.to_str().expect("utf-8"),
            "--option",
            "trusted-public-keys",
            &public,
            &f.top,
        ],
    );
    for p in &f.closure {
        let copied = nix(
            "nix-store",
            &[
                "--store",
                target_store.to_str().expect("utf-8"),
                "--dump",
                p,
            ],
        );
        assert!(
            copied == nix("nix-store", &["--dump", p]),
            "{p} differs after copy"
        );
    }
    // Nix's local store makes some files read-only; let the temp dir be removed.
    let _ = Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(target.path())
        .status();
}
