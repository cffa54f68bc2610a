//! `local_store` against real Nix: a small closure built with `nix-build`, read through the
//! database and through a `nix-daemon` started here, compared with `nix-store -qR`,
//! `nix path-info --json` and `nix-store --dump`.
//!
//! Needs Nix (tested with 2.8) run as root without a daemon. Without `nix` these tests fail,
//! unless LARDER_ALLOW_NO_NIX=1, which turns them into no-ops.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use larder_client::local_store::{
    default_db_path, dump_verified, LocalStore, LocalStoreError, PathInfo,
};
use larder_nix::hash::Sha256;
use larder_nix::store_path::StorePath;

const CLOSURE_NIX: &str = r#"
{ salt }:
let
  mk = name: script: derivation {
    name = "${name}-${salt}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" ("export PATH=/bin:/usr/bin; set -e; " + script) ];
  };
  leaf = mk "leaf" "echo leaf-${salt} > $out";
  note = builtins.toFile "note-${salt}" "a text file, content-addressed";
  dir = mk "dir" ''
    mkdir -p $out/bin $out/share/a $out/empty-dir
    printf '#!/bin/sh\necho ${leaf}\n' > $out/bin/exe; chmod +x $out/bin/exe
    echo x > $out/share/a/f; : > $out/empty; ln -s ../share $out/bin/link
  '';
  link = mk "link" "ln -s ${leaf} $out";
  mid = mk "mid" "mkdir $out; echo ${dir} ${link} > $out/refs; echo $out > $out/self";
in mk "top" "mkdir $out; echo ${mid} ${leaf} ${note} > $out/refs"
"#;

/// Whether to run: true with Nix, false (skip) only when LARDER_ALLOW_NO_NIX=1.
fn have_nix() -> bool {
    let ok = nix("nix-build")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("LARDER_ALLOW_NO_NIX").as_deref() == Ok("1"),
            "nix-build not found: these tests need Nix (set LARDER_ALLOW_NO_NIX=1 to skip them)"
        );
        eprintln!("skipping: no nix and LARDER_ALLOW_NO_NIX=1");
    }
    ok
}

/// `program` with the shared isolated test settings (larder_testkit::nix): no build users, no
/// sandbox, no substituters (no network), no machine or user nix.conf, no daemon.
fn nix(program: &str) -> Command {
    larder_testkit::nix::command(program)
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn run_str(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd)).unwrap().trim().to_owned()
}

fn salt(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{test}-{}-{nanos}", std::process::id())
}

fn sp(s: &str) -> StorePath {
    StorePath::from_absolute(s).unwrap()
}

/// A built test closure: its top path, a `result` symlink to it, and the other outputs.
struct Built {
    dir: tempfile::TempDir,
    top: StorePath,
    result_link: PathBuf,
    salt: String,
}

impl Built {
    fn closure_paths(&self) -> BTreeSet<StorePath> {
        run_str(nix("nix-store").args(["-qR", &self.top.to_absolute()]))
            .lines()
            .map(sp)
            .collect()
    }

    /// The closure member whose name starts with `prefix-`.
    fn member(&self, prefix: &str) -> StorePath {
        let want = format!("{prefix}-{}", self.salt);
        self.closure_paths()
            .into_iter()
            .find(|p| p.name() == want)
            .unwrap_or_else(|| panic!("no {want} in the closure"))
    }
}

fn build(test: &str) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let salt = salt(test);
    let file = dir.path().join("closure.nix");
    std::fs::write(&file, CLOSURE_NIX).unwrap();
    let result_link = dir.path().join("result");
    let top = run_str(
        nix("nix-build")
            .arg(&file)
            .args(["--argstr", "salt", &salt, "-o"])
            .arg(&result_link),
    );
    Built {
        top: sp(&top),
        dir,
        result_link,
        salt,
    }
}

/// `nix path-info --json` of `paths`, by path.
fn nix_path_info(paths: &[&StorePath]) -> BTreeMap<String, serde_json::Value> {
    let out = run(nix("nix")
        .args(["path-info", "--json"])
        .args(paths.iter().map(|p| p.to_absolute())));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
    list.into_iter()
        .map(|v| (v["path"].as_str().unwrap().to_owned(), v))
        .collect()
}

/// Our record equals Nix's, field by field.
fn assert_same_as_nix(info: &PathInfo, nix: &serde_json::Value) {
    let p = &info.path;
    assert_eq!(nix["path"], p.to_absolute());
    assert_eq!(
        Sha256::parse(nix["narHash"].as_str().unwrap()).unwrap(),
        info.nar_hash,
        "narHash of {p}"
    );
    assert_eq!(
        nix["narSize"].as_u64().unwrap(),
        info.nar_size,
        "narSize of {p}"
    );
    let refs: Vec<String> = info.references.iter().map(StorePath::to_absolute).collect();
    let nix_refs: Vec<String> = nix["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(refs, nix_refs, "references of {p}");
    assert_eq!(
        nix.get("deriver").and_then(|d| d.as_str()).map(sp),
        info.deriver,
        "deriver of {p}"
    );
    let nix_sigs: Vec<&str> = nix
        .get("signatures")
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(info.sigs, nix_sigs, "signatures of {p}");
    assert_eq!(
        nix.get("ca").and_then(|c| c.as_str()),
        info.ca.as_deref(),
        "ca of {p}"
    );
    assert_eq!(
        nix["registrationTime"].as_i64().unwrap(),
        info.registration_time,
        "registrationTime of {p}"
    );
}

/// `closure` is the closure of `built.top` as Nix computes it, every path after its references,
/// and every record equals `nix path-info --json`.
fn check_closure(store: &mut LocalStore, built: &Built) -> Vec<PathInfo> {
    let closure = store.closure(std::slice::from_ref(&built.top)).unwrap();
    let ours: Vec<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
    let unique: BTreeSet<StorePath> = ours.iter().cloned().collect();
    assert_eq!(unique.len(), ours.len(), "a path appears twice: {ours:?}");
    assert_eq!(
        unique,
        built.closure_paths(),
        "closure differs from nix-store -qR"
    );
    let mut seen = HashSet::new();
    for info in &closure {
        for r in &info.references {
            assert!(
                *r == info.path || seen.contains(r),
                "{} comes before its reference {r}",
                info.path
            );
        }
        seen.insert(info.path.clone());
    }
    assert_eq!(closure.last().map(|i| &i.path), Some(&built.top));

    let nix = nix_path_info(&ours.iter().collect::<Vec<_>>());
    for info in &closure {
        assert_same_as_nix(info, &nix[&info.path.to_absolute()]);
    }
    // The shapes the closure was built to have.
    let by_name = |prefix: &str| {
        let want = format!("{prefix}-{}", built.salt);
        closure.iter().find(|i| i.path.name() == want).unwrap()
    };
    assert!(by_name("note")
        .ca
        .as_deref()
        .unwrap()
        .starts_with("text:sha256:"));
    assert!(by_name("note").deriver.is_none());
    assert!(
        by_name("mid").references.contains(&by_name("mid").path),
        "self-reference"
    );
    assert_eq!(by_name("link").references, [by_name("leaf").path.clone()]);
    assert!(!by_name("top").sigs.is_empty(), "top was signed");
    closure
}

/// Sign `path` with a fresh key, so that signatures are compared too.
fn sign(built: &Built, path: &StorePath) {
    let sec = built.dir.path().join("key.sec");
    let public = built.dir.path().join("key.pub");
    run(nix("nix-store")
        .args([
            "--generate-binary-cache-key",
            &format!("larder-test-{}", built.salt),
        ])
        .args([&sec, &public]));
    run(nix("nix")
        .args(["store", "sign", "--key-file"])
        .arg(&sec)
        .arg(path.to_absolute()));
}

#[test]
fn db_closure_and_records_match_nix() {
    if !have_nix() {
        return;
    }
    let built = build("db");
    sign(&built, &built.top);
    let mut store = LocalStore::open_db(&default_db_path()).unwrap();
    assert!(matches!(store, LocalStore::Db(_)));
    check_closure(&mut store, &built);

    // Batch lookups keep order and say None for unknown paths.
    let missing = sp("/nix/store/00000000000000000000000000000000-larder-missing");
    let infos = store
        .query_path_infos(&[missing.clone(), built.top.clone(), missing.clone()])
        .unwrap();
    assert!(infos[0].is_none() && infos[2].is_none());
    assert_eq!(infos[1].as_ref().unwrap().path, built.top);
    assert_eq!(store.query_path_info(&missing).unwrap(), None);

    // open_default picks the database here (root, no daemon).
    if std::env::var_os("NIX_REMOTE").is_none() {
        let mut default = LocalStore::open_default().unwrap();
        assert!(
            default.describe().starts_with("database "),
            "{}",
            default.describe()
        );
        assert!(default.query_path_info(&built.top).unwrap().is_some());
    }
}

#[test]
fn closure_of_an_invalid_path_names_it() {
    if !have_nix() {
        return;
    }
    let mut store = LocalStore::open_db(&default_db_path()).unwrap();
    let missing = sp("/nix/store/00000000000000000000000000000000-larder-missing");
    let err = store.closure(std::slice::from_ref(&missing)).unwrap_err();
    assert!(
        matches!(&err, LocalStoreError::NotValid { path, referrer: None } if *path == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains(&missing.to_absolute()), "{err}");
    assert!(store.closure(&[]).unwrap().is_empty());
}

#[test]
fn open_db_failure_suggests_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let err = LocalStore::open_db(&dir.path().join("nope.sqlite")).unwrap_err();
    assert!(matches!(err, LocalStoreError::OpenDb { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("nope.sqlite") && msg.contains("NIX_REMOTE=daemon"),
        "{msg}"
    );

    // A file that is not a Nix database.
    let other = dir.path().join("other.sqlite");
    std::fs::write(&other, b"").unwrap();
    assert!(matches!(
        LocalStore::open_db(&other).unwrap_err(),
        LocalStoreError::OpenDb { .. }
    ));
}

/// A `nix-daemon` of our own on a socket in a temporary directory, killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("socket");
        let child = nix("nix-daemon")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let daemon = Self {
            child,
            socket,
            _dir: dir,
        };
        // The socket file appears when it is bound, before the daemon listens: wait until a
        // connection is accepted.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "nix-daemon did not accept connections on its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn daemon_closure_and_records_match_nix_and_db() {
    if !have_nix() {
        return;
    }
    let built = build("daemon");
    sign(&built, &built.top);
    let daemon = Daemon::start();
    let from_daemon = {
        let mut store = LocalStore::open_daemon(&daemon.socket).unwrap();
        let LocalStore::Daemon(d) = &store else {
            panic!("not a daemon store")
        };
        assert_eq!(d.nix_version(), Some(nix_version().as_str()));
        assert!(
            store.describe().starts_with("nix-daemon "),
            "{}",
            store.describe()
        );
        let closure = check_closure(&mut store, &built);

        // Unknown paths, in a batch larger than one pipeline, keep their order.
        let missing = sp("/nix/store/00000000000000000000000000000000-larder-missing");
        let mut batch: Vec<StorePath> = Vec::new();
        for _ in 0..40 {
            batch.push(missing.clone());
            batch.extend(closure.iter().map(|i| i.path.clone()));
        }
        let infos = store.query_path_infos(&batch).unwrap();
        for (p, info) in batch.iter().zip(&infos) {
            assert_eq!(info.as_ref().map(|i| &i.path), (*p != missing).then_some(p));
        }
        let err = store.closure(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(err, LocalStoreError::NotValid { .. }), "{err:?}");
        // Still in step after all that.
        assert!(store.query_path_info(&built.top).unwrap().is_some());
        closure
    };
    let from_db = LocalStore::open_db(&default_db_path())
        .unwrap()
        .closure(std::slice::from_ref(&built.top))
        .unwrap();
    assert_eq!(from_daemon, from_db, "daemon and database disagree");
    drop(daemon);
}

#[test]
fn daemon_connect_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-socket");
    let err = LocalStore::open_daemon(&socket).unwrap_err();
    assert!(matches!(err, LocalStoreError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("no-socket"), "{err}");
    assert!(err.to_string().contains("nix-daemon"), "{err}");
}

fn nix_version() -> String {
    // "nix (Nix) 2.8.0"
    run_str(nix("nix").arg("--version"))
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn dump_verified_equals_nix_store_dump() {
    if !have_nix() {
        return;
    }
    let built = build("dump");
    let mut store = LocalStore::open_db(&default_db_path()).unwrap();
    let closure = store.closure(std::slice::from_ref(&built.top)).unwrap();
    for info in &closure {
        let ours = dump_verified(info, Vec::new()).unwrap();
        let nix = run(nix("nix-store").args(["--dump", &info.path.to_absolute()]));
        assert!(
            ours == nix,
            "NAR of {} differs from nix-store --dump",
            info.path
        );
    }
}

/// A throwaway path of its own, outside any closure other tests use.
fn build_throwaway(test: &str) -> StorePath {
    let dir = tempfile::tempdir().unwrap();
    let expr = format!(
        r#"derivation {{ name = "throwaway-{}"; system = builtins.currentSystem; builder = "/bin/sh";
             args = [ "-c" "/bin/mkdir $out; echo original > $out/file" ]; }}"#,
        salt(test)
    );
    let file = dir.path().join("t.nix");
    std::fs::write(&file, expr).unwrap();
    sp(&run_str(nix("nix-build").arg(&file).arg("--no-out-link")))
}

#[test]
fn corrupt_path_is_reported_with_the_repair_command() {
    if !have_nix() {
        return;
    }
    let path = build_throwaway("corrupt");
    let info = LocalStore::open_db(&default_db_path())
        .unwrap()
        .query_path_info(&path)
        .unwrap()
        .unwrap();
    let file = Path::new(&path.to_absolute()).join("file");
    run(Command::new("chmod")
        .args(["u+w"])
        .arg(path.to_absolute())
        .arg(&file));
    std::fs::write(&file, "tampered\n").unwrap();
    let err = dump_verified(&info, Vec::new()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, LocalStoreError::Corrupt { path: p, mismatch }
            if *p == path && mismatch.expected_hash == info.nar_hash
                && mismatch.actual_hash != mismatch.expected_hash),
        "{err:?}"
    );
    assert!(
        msg.contains(&format!("nix-store --repair-path {path}")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("nix-store --verify-path {path}")),
        "{msg}"
    );
    // Nix agrees that it is corrupt.
    let verify = nix("nix-store")
        .args(["--verify-path", &path.to_absolute()])
        .output()
        .unwrap();
    assert!(
        !verify.status.success(),
        "nix-store --verify-path accepted the tampered path"
    );
    // Leave no corrupt path behind.
    let _ = nix("nix-store")
        .args(["--delete", &path.to_absolute()])
        .output();
}

#[test]
fn vanished_path_is_reported_as_vanished() {
    if !have_nix() {
        return;
    }
    let path = build_throwaway("vanish");
    let info = LocalStore::open_db(&default_db_path())
        .unwrap()
        .query_path_info(&path)
        .unwrap()
        .unwrap();
    run(nix("nix-store").args(["--delete", &path.to_absolute()]));
    let err = dump_verified(&info, Vec::new()).unwrap_err();
    assert!(
        matches!(&err, LocalStoreError::Vanished(p) if *p == path),
        "{err:?}"
    );
}

#[test]
fn write_errors_are_not_blamed_on_the_store() {
    if !have_nix() {
        return;
    }
    struct Broken;
    impl std::io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let path = build_throwaway("write");
    let info = LocalStore::open_db(&default_db_path())
        .unwrap()
        .query_path_info(&path)
        .unwrap()
        .unwrap();
    let err = dump_verified(&info, Broken).err().unwrap();
    assert!(matches!(err, LocalStoreError::Write { .. }), "{err:?}");
}

#[test]
fn resolve_arg_follows_links_into_the_store() {
    if !have_nix() {
        return;
    }
    let built = build("resolve");
    let resolve = |arg: &Path| LocalStore::resolve_arg(arg.to_str().unwrap());
    let top = built.top.to_absolute();

    // A store path, and ./result.
    assert_eq!(LocalStore::resolve_arg(&top).unwrap(), built.top);
    assert_eq!(resolve(&built.result_link).unwrap(), built.top);
    // Several hops: link -> link -> result -> store path.
    let hop1 = built.dir.path().join("hop1");
    let hop2 = built.dir.path().join("sub/hop2");
    std::fs::create_dir(built.dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("result", &hop1).unwrap();
    std::os::unix::fs::symlink("../hop1", &hop2).unwrap();
    assert_eq!(resolve(&hop2).unwrap(), built.top);
    // Relative to the current directory.
    let cwd = std::env::current_dir().unwrap();
    let relative = format!(
        "{}{}",
        "../".repeat(cwd.components().count() - 1),
        hop2.strip_prefix("/").unwrap().display()
    );
    assert_eq!(LocalStore::resolve_arg(&relative).unwrap(), built.top);
    // Paths inside a store path, directly and through a link to it.
    let dir = built.member("dir");
    let exe = format!("{dir}/bin/exe");
    assert_eq!(LocalStore::resolve_arg(&exe).unwrap(), dir);
    assert_eq!(
        LocalStore::resolve_arg(&format!("{dir}/bin/link/a/f")).unwrap(),
        dir
    );
    let dir_link = built.dir.path().join("dir-result");
    std::os::unix::fs::symlink(dir.to_absolute(), &dir_link).unwrap();
    assert_eq!(resolve(&dir_link.join("bin/exe")).unwrap(), dir);
    assert_eq!(resolve(&dir_link.join("./bin//exe")).unwrap(), dir);
    // A symlink-only store path is itself, not what it points to.
    let link = built.member("link");
    assert_eq!(LocalStore::resolve_arg(&link.to_absolute()).unwrap(), link);

    // Non-store paths.
    for arg in ["/etc/passwd", "/nix/store", "/"] {
        let err = LocalStore::resolve_arg(arg).unwrap_err();
        assert!(
            matches!(err, LocalStoreError::NotInStore { .. }),
            "{arg}: {err:?}"
        );
        assert!(err.to_string().contains("not in the Nix store"), "{err}");
    }
    let plain = built.dir.path().join("closure.nix");
    assert!(matches!(
        resolve(&plain),
        Err(LocalStoreError::NotInStore { .. })
    ));
    let out_link = built.dir.path().join("to-tmp");
    std::os::unix::fs::symlink(built.dir.path(), &out_link).unwrap();
    assert!(matches!(
        resolve(&out_link),
        Err(LocalStoreError::NotInStore { .. })
    ));
    // Escaping a store path with .. is not inside it.
    let escape = format!("{dir}/../../../etc/passwd");
    assert!(matches!(
        LocalStore::resolve_arg(&escape),
        Err(LocalStoreError::NotInStore { .. })
    ));
    let missing = built.dir.path().join("missing");
    assert!(matches!(
        resolve(&missing),
        Err(LocalStoreError::Resolve { .. })
    ));
    let dangling = built.dir.path().join("dangling");
    std::os::unix::fs::symlink("/nonexistent/x", &dangling).unwrap();
    assert!(matches!(
        resolve(&dangling),
        Err(LocalStoreError::Resolve { .. })
    ));
    let looped = built.dir.path().join("loop");
    std::os::unix::fs::symlink("loop", &looped).unwrap();
    assert!(matches!(
        resolve(&looped),
        Err(LocalStoreError::Resolve { .. })
    ));
}
