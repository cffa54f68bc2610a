//! A client of the nix-daemon worker protocol, enough to read path metadata.
//!
//! Follows Nix 2.8's
//! [`src/libstore/worker-protocol.hh`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/worker-protocol.hh),
//! [`daemon.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/daemon.cc) (`processConnection`,
//! `performOp`, `TunnelLogger`) and
//! [`remote-store.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/remote-store.cc)
//! (`initConnection`, `processStderr`).
//!
//! Wire format: every integer is a little-endian `u64`; a string is its length, its bytes and
//! zero padding to a multiple of 8; a list or set is a count followed by its strings.
//!
//! Handshake: the client sends `WORKER_MAGIC_1`, reads `WORKER_MAGIC_2` and the daemon's
//! protocol version, sends its own version, then (minor ≥ 14) `0` for "no CPU affinity" and
//! (minor ≥ 11) `0` for the obsolete reserveSpace; from minor 33 the daemon sends its Nix
//! version string; then it sends log messages ending with `STDERR_LAST`. Both sides act on the
//! lower of the two versions, so we do the same.
//!
//! Each operation is the opcode and its arguments; the daemon answers with log messages
//! (`STDERR_NEXT`, activities, results) ended by `STDERR_LAST`, followed by the reply, or by
//! `STDERR_ERROR` and no reply. Requests of a batch are pipelined (written together, answers
//! read in order), which the daemon allows because it handles one operation at a time.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use larder_nix::hash::Sha256;
use larder_nix::store_path::StorePath;

use super::{bad, parse_path, LocalStoreError, PathInfo};

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// Protocol 1.34, Nix 2.8's own; newer daemons speak it too.
const CLIENT_VERSION: u64 = 1 << 8 | 34;
/// Oldest daemon we talk to: 1.21 (Nix 2.0) has activities and a validity flag in
/// `QueryPathInfo` replies (1.17) and signatures (1.16).
const MIN_DAEMON_MINOR: u64 = 21;

const WOP_QUERY_PATH_INFO: u64 = 26;

const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;

/// Requests written before their answers are read. Answers to a batch must fit in the
/// socket buffers, or the daemon would block writing while we block writing too.
const PIPELINE: usize = 32;
/// Longest string accepted from the daemon (a log line, a path, a signature list entry).
const MAX_STRING: u64 = 16 << 20;
/// Most elements accepted in one list from the daemon.
const MAX_LIST: u64 = 1 << 24;

/// A connection to a nix-daemon.
#[derive(Debug)]
pub struct DaemonStore {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    /// The protocol version both sides use: the lower of theirs and ours.
    version: u64,
    nix_version: Option<String>,
}

/// Why one exchange failed, before it is given the socket path.
enum Failure {
    Io(io::Error),
    Protocol(String),
    Remote(String),
    /// A reply read whole whose contents are invalid.
    Bad(Box<LocalStoreError>),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl DaemonStore {
    /// Connect to the daemon at `socket` and do the handshake.
    pub fn connect(socket: &Path) -> Result<Self, LocalStoreError> {
        let stream = UnixStream::connect(socket).map_err(|source| LocalStoreError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        let read_half = stream
            .try_clone()
            .map_err(|source| LocalStoreError::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        let mut store = Self {
            socket: socket.to_owned(),
            reader: BufReader::with_capacity(64 * 1024, read_half),
            writer: BufWriter::with_capacity(16 * 1024, stream),
            version: CLIENT_VERSION,
            nix_version: None,
        };
        store
            .handshake()
            .map_err(|f| store.error(f, "the handshake"))?;
        Ok(store)
    }

    /// The socket this store is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's Nix version, when it says (protocol 1.33 and later).
    pub fn nix_version(&self) -> Option<&str> {
        self.nix_version.as_deref()
    }

    /// The protocol version in use, `major << 8 | minor`.
    pub fn protocol_version(&self) -> u64 {
        self.version
    }

    fn minor(&self) -> u64 {
        self.version & 0xff
    }

    fn handshake(&mut self) -> Result<(), Failure> {
        write_u64(&mut self.writer, WORKER_MAGIC_1)?;
        self.writer.flush()?;
        let magic = read_u64(&mut self.reader)?;
        if magic != WORKER_MAGIC_2 {
            return Err(Failure::Protocol(format!(
                "expected the daemon's magic {WORKER_MAGIC_2:#x}, got {magic:#x}: not a nix-daemon socket?"
            )));
        }
        let daemon_version = read_u64(&mut self.reader)?;
        if daemon_version >> 8 != 1 || daemon_version & 0xff < MIN_DAEMON_MINOR {
            return Err(Failure::Protocol(format!(
                "daemon protocol {}.{} is not supported (need 1.{MIN_DAEMON_MINOR} or later, Nix 2.0+)",
                daemon_version >> 8,
                daemon_version & 0xff
            )));
        }
        self.version = daemon_version.min(CLIENT_VERSION);
        write_u64(&mut self.writer, CLIENT_VERSION)?;
        if self.minor() >= 14 {
            write_u64(&mut self.writer, 0)?; // no CPU affinity (obsolete)
        }
        if self.minor() >= 11 {
            write_u64(&mut self.writer, 0)?; // reserveSpace (obsolete)
        }
        self.writer.flush()?;
        if self.minor() >= 33 {
            self.nix_version = Some(read_string_lossy(&mut self.reader)?);
        }
        self.process_stderr()
    }

    /// Read log messages up to `STDERR_LAST`; an `STDERR_ERROR` ends the operation with the
    /// daemon's message.
    fn process_stderr(&mut self) -> Result<(), Failure> {
        let r = &mut self.reader;
        loop {
            match read_u64(r)? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT => {
                    read_string_lossy(r)?;
                }
                STDERR_WRITE => {
                    skip_string(r)?;
                }
                STDERR_START_ACTIVITY => {
                    let _id = read_u64(r)?;
                    let _level = read_u64(r)?;
                    let _type = read_u64(r)?;
                    read_string_lossy(r)?;
                    skip_fields(r)?;
                    let _parent = read_u64(r)?;
                }
                STDERR_STOP_ACTIVITY => {
                    let _id = read_u64(r)?;
                }
                STDERR_RESULT => {
                    let _id = read_u64(r)?;
                    let _type = read_u64(r)?;
                    skip_fields(r)?;
                }
                STDERR_ERROR => {
                    let message = if self.version & 0xff >= 26 {
                        read_error(r)?
                    } else {
                        let msg = read_string_lossy(r)?;
                        let _status = read_u64(r)?;
                        msg
                    };
                    return Err(Failure::Remote(message));
                }
                STDERR_READ => {
                    return Err(Failure::Protocol(
                        "the daemon asked for data (STDERR_READ) during a query".into(),
                    ))
                }
                other => {
                    return Err(Failure::Protocol(format!(
                        "unknown log message type {other:#x}"
                    )))
                }
            }
        }
    }

    /// The records of `paths`, in order, `None` for paths that are not valid.
    pub fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<PathInfo>>, LocalStoreError> {
        let mut out = Vec::with_capacity(paths.len());
        for batch in paths.chunks(PIPELINE) {
            self.send_query_path_info(batch)
                .map_err(|f| self.error(f, "QueryPathInfo"))?;
            // Read every answer even after an error, so the connection stays in step.
            let mut first_error = None;
            for path in batch {
                match self.read_query_path_info(path) {
                    Ok(info) => out.push(info),
                    Err(Failure::Remote(message)) => {
                        first_error.get_or_insert(LocalStoreError::Daemon {
                            socket: self.socket.clone(),
                            request: format!("QueryPathInfo {path}"),
                            message,
                        });
                        out.push(None);
                    }
                    Err(Failure::Bad(e)) => {
                        // The reply was read whole; only its contents were wrong.
                        first_error.get_or_insert(*e);
                        out.push(None);
                    }
                    Err(f) => return Err(self.error(f, &format!("QueryPathInfo {path}"))),
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(out)
    }

    fn send_query_path_info(&mut self, batch: &[StorePath]) -> Result<(), Failure> {
        for path in batch {
            write_u64(&mut self.writer, WOP_QUERY_PATH_INFO)?;
            write_string(&mut self.writer, path.to_absolute().as_bytes())?;
        }
        self.writer.flush()?;
        Ok(())
    }

    /// One `QueryPathInfo` answer: `ValidPathInfo::write` without the path.
    fn read_query_path_info(&mut self, path: &StorePath) -> Result<Option<PathInfo>, Failure> {
        self.process_stderr()?;
        let minor = self.minor();
        let r = &mut self.reader;
        if minor >= 17 && read_u64(r)? == 0 {
            return Ok(None);
        }
        let deriver = read_string_lossy(r)?;
        let hash = read_string_lossy(r)?;
        let references = read_strings(r)?;
        let registration_time = read_u64(r)?;
        let nar_size = read_u64(r)?;
        let (sigs, ca) = if minor >= 16 {
            let _ultimate = read_u64(r)?;
            (read_strings(r)?, read_string_lossy(r)?)
        } else {
            (Vec::new(), String::new())
        };
        // Everything of the reply is read; from here on errors leave the stream in step.
        let build = || -> Result<PathInfo, LocalStoreError> {
            let mut refs = references
                .iter()
                .map(|s| parse_path(path, "reference", s))
                .collect::<Result<Vec<_>, _>>()?;
            refs.sort();
            Ok(PathInfo {
                path: path.clone(),
                nar_hash: Sha256::parse(&hash).map_err(|e| bad(path, "narHash", &hash, e))?,
                nar_size,
                references: refs,
                deriver: match deriver.as_str() {
                    "" => None,
                    d => Some(parse_path(path, "deriver", d)?),
                },
                sigs,
                ca: Some(ca).filter(|c| !c.is_empty()),
                registration_time: i64::try_from(registration_time).unwrap_or(i64::MAX),
            })
        };
        build().map(Some).map_err(|e| Failure::Bad(Box::new(e)))
    }

    fn error(&self, failure: Failure, request: &str) -> LocalStoreError {
        let socket = self.socket.clone();
        match failure {
            Failure::Io(source) if source.kind() == io::ErrorKind::UnexpectedEof => {
                LocalStoreError::DaemonProtocol {
                    socket,
                    message: format!("the daemon closed the connection during {request}"),
                }
            }
            Failure::Io(source) => LocalStoreError::DaemonIo { socket, source },
            Failure::Protocol(message) => LocalStoreError::DaemonProtocol {
                socket,
                message: format!("{message} (during {request})"),
            },
            Failure::Remote(message) => LocalStoreError::Daemon {
                socket,
                request: request.to_owned(),
                message,
            },
            Failure::Bad(e) => *e,
        }
    }
}

fn write_u64(w: &mut impl Write, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

fn write_string(w: &mut impl Write, s: &[u8]) -> io::Result<()> {
    write_u64(w, s.len() as u64)?;
    w.write_all(s)?;
    w.write_all(&[0u8; 8][..padding(s.len() as u64)])
}

fn padding(len: u64) -> usize {
    // Always < 8.
    ((8 - len % 8) % 8) as usize
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string(r: &mut impl Read) -> Result<Vec<u8>, Failure> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        return Err(Failure::Protocol(format!(
            "string of {len} bytes is too long"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    let mut pad = [0u8; 8];
    let pad = &mut pad[..padding(len)];
    r.read_exact(pad)?;
    if pad.iter().any(|&b| b != 0) {
        return Err(Failure::Protocol("non-zero string padding".into()));
    }
    Ok(buf)
}

fn read_string_lossy(r: &mut impl Read) -> Result<String, Failure> {
    Ok(match String::from_utf8(read_string(r)?) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

fn skip_string(r: &mut impl Read) -> Result<(), Failure> {
    let len = read_u64(r)?;
    let total = len
        .checked_add(padding(len) as u64)
        .ok_or_else(|| Failure::Protocol(format!("string of {len} bytes is too long")))?;
    let skipped = io::copy(&mut r.take(total), &mut io::sink())?;
    if skipped != total {
        return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

fn read_strings(r: &mut impl Read) -> Result<Vec<String>, Failure> {
    let n = read_u64(r)?;
    if n > MAX_LIST {
        return Err(Failure::Protocol(format!(
            "list of {n} elements is too long"
        )));
    }
    (0..n).map(|_| read_string_lossy(r)).collect()
}

/// Activity and result fields: a count, then per field a type (0 int, 1 string) and a value.
fn skip_fields(r: &mut impl Read) -> Result<(), Failure> {
    let n = read_u64(r)?;
    if n > MAX_LIST {
        return Err(Failure::Protocol(format!("{n} log fields is too many")));
    }
    for _ in 0..n {
        match read_u64(r)? {
            0 => {
                read_u64(r)?;
            }
            1 => skip_string(r)?,
            t => return Err(Failure::Protocol(format!("unknown log field type {t}"))),
        }
    }
    Ok(())
}

/// An `Error` as serialised from protocol 1.26: type ("Error"), level, name, message, a
/// position flag, then traces (position flag, hint each). Returns the message with traces.
fn read_error(r: &mut impl Read) -> Result<String, Failure> {
    let _type = read_string_lossy(r)?;
    let _level = read_u64(r)?;
    let _name = read_string_lossy(r)?;
    let mut message = read_string_lossy(r)?;
    let _have_pos = read_u64(r)?;
    let traces = read_u64(r)?;
    if traces > MAX_LIST {
        return Err(Failure::Protocol(format!(
            "{traces} error traces is too many"
        )));
    }
    for _ in 0..traces {
        let _have_pos = read_u64(r)?;
        let hint = read_string_lossy(r)?;
        message.push_str("\n… ");
        message.push_str(&hint);
    }
    Ok(strip_ansi(message.trim_end()))
}

/// `s` without the ANSI colour sequences (`ESC [ … letter`) Nix puts around names in errors.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.clone().next() == Some('[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const PATH: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x";
    const REF: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-y";

    fn w_str(w: &mut impl Write, s: &str) {
        write_string(w, s.as_bytes()).unwrap();
    }

    /// A scripted daemon: handshake at 1.34, then answers two pipelined `QueryPathInfo`s,
    /// the first with log traffic and a record, the second with an error, then a third
    /// (after the error) with "not valid".
    fn fake_daemon(listener: UnixListener) {
        let (stream, _) = listener.accept().unwrap();
        let mut r = BufReader::new(stream.try_clone().unwrap());
        let mut w = BufWriter::new(stream);
        assert_eq!(read_u64(&mut r).unwrap(), WORKER_MAGIC_1);
        write_u64(&mut w, WORKER_MAGIC_2).unwrap();
        write_u64(&mut w, 1 << 8 | 37).unwrap();
        w.flush().unwrap();
        assert_eq!(read_u64(&mut r).unwrap(), CLIENT_VERSION);
        assert_eq!(read_u64(&mut r).unwrap(), 0);
        assert_eq!(read_u64(&mut r).unwrap(), 0);
        w_str(&mut w, "2.99.0");
        write_u64(&mut w, STDERR_NEXT).unwrap();
        w_str(&mut w, "warning: hello\n");
        write_u64(&mut w, STDERR_LAST).unwrap();
        w.flush().unwrap();
        for _ in 0..2 {
            assert_eq!(read_u64(&mut r).unwrap(), WOP_QUERY_PATH_INFO);
            assert_eq!(read_string(&mut r).ok().unwrap(), PATH.as_bytes());
        }
        // First answer: an activity with both field types, a result, a log line.
        write_u64(&mut w, STDERR_START_ACTIVITY).unwrap();
        for n in [7, 3, 100] {
            write_u64(&mut w, n).unwrap();
        }
        w_str(&mut w, "querying");
        write_u64(&mut w, 2).unwrap();
        write_u64(&mut w, 0).unwrap();
        write_u64(&mut w, 42).unwrap();
        write_u64(&mut w, 1).unwrap();
        w_str(&mut w, "field");
        write_u64(&mut w, 0).unwrap();
        write_u64(&mut w, STDERR_RESULT).unwrap();
        write_u64(&mut w, 7).unwrap();
        write_u64(&mut w, 105).unwrap();
        write_u64(&mut w, 0).unwrap();
        write_u64(&mut w, STDERR_STOP_ACTIVITY).unwrap();
        write_u64(&mut w, 7).unwrap();
        write_u64(&mut w, STDERR_LAST).unwrap();
        write_u64(&mut w, 1).unwrap();
        w_str(&mut w, "");
        w_str(&mut w, &"ab".repeat(32));
        write_u64(&mut w, 2).unwrap();
        w_str(&mut w, REF);
        w_str(&mut w, PATH);
        write_u64(&mut w, 1_700_000_000).unwrap();
        write_u64(&mut w, 1234).unwrap();
        write_u64(&mut w, 1).unwrap();
        write_u64(&mut w, 1).unwrap();
        w_str(&mut w, "k-1:c2ln");
        w_str(
            &mut w,
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        );
        // Second answer: an error (protocol 1.26+ form) with a trace.
        write_u64(&mut w, STDERR_ERROR).unwrap();
        w_str(&mut w, "Error");
        write_u64(&mut w, 0).unwrap();
        w_str(&mut w, "Error");
        w_str(&mut w, "path '\u{1b}[35;1mx\u{1b}[0m' is broken");
        write_u64(&mut w, 0).unwrap();
        write_u64(&mut w, 1).unwrap();
        write_u64(&mut w, 0).unwrap();
        w_str(&mut w, "while testing");
        w.flush().unwrap();
        // Third request, after the error: not valid.
        assert_eq!(read_u64(&mut r).unwrap(), WOP_QUERY_PATH_INFO);
        assert_eq!(read_string(&mut r).ok().unwrap(), PATH.as_bytes());
        write_u64(&mut w, STDERR_LAST).unwrap();
        write_u64(&mut w, 0).unwrap();
        w.flush().unwrap();
    }

    #[test]
    fn speaks_the_protocol_to_a_scripted_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("socket");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || fake_daemon(listener));
        let mut store = DaemonStore::connect(&socket).unwrap();
        assert_eq!(store.nix_version(), Some("2.99.0"));
        assert_eq!(store.protocol_version(), CLIENT_VERSION);
        let path = StorePath::from_absolute(PATH).unwrap();
        let err = store
            .query_path_infos(&[path.clone(), path.clone()])
            .unwrap_err();
        let LocalStoreError::Daemon {
            message, request, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(message, "path 'x' is broken\n… while testing");
        assert_eq!(request, &format!("QueryPathInfo {PATH}"));
        assert_eq!(
            store.query_path_infos(std::slice::from_ref(&path)).unwrap(),
            [None]
        );
        server.join().unwrap();
    }

    #[test]
    fn parses_a_record() {
        let mut buf = Vec::new();
        write_u64(&mut buf, STDERR_LAST).unwrap();
        write_u64(&mut buf, 1).unwrap();
        w_str(
            &mut buf,
            "/nix/store/cccccccccccccccccccccccccccccccc-x.drv",
        );
        w_str(&mut buf, &"ab".repeat(32));
        write_u64(&mut buf, 2).unwrap();
        w_str(&mut buf, REF);
        w_str(&mut buf, PATH);
        for n in [1_700_000_000, 1234, 1] {
            write_u64(&mut buf, n).unwrap();
        }
        write_u64(&mut buf, 1).unwrap();
        w_str(&mut buf, "k-1:c2ln");
        w_str(&mut buf, "");
        let (client, mut server) = UnixStream::pair().unwrap();
        server.write_all(&buf).unwrap();
        let mut store = DaemonStore {
            socket: PathBuf::from("test"),
            reader: BufReader::new(client.try_clone().unwrap()),
            writer: BufWriter::new(client),
            version: CLIENT_VERSION,
            nix_version: None,
        };
        let path = StorePath::from_absolute(PATH).unwrap();
        let Ok(Some(info)) = store.read_query_path_info(&path) else {
            panic!("no record")
        };
        assert_eq!(info.nar_hash.to_hex(), "ab".repeat(32));
        assert_eq!(info.nar_size, 1234);
        assert_eq!(info.registration_time, 1_700_000_000);
        let refs: Vec<String> = info.references.iter().map(StorePath::to_absolute).collect();
        assert_eq!(refs, [PATH, REF], "sorted");
        assert_eq!(info.deriver.unwrap().name(), "x.drv");
        assert_eq!(info.sigs, ["k-1:c2ln"]);
        assert_eq!(info.ca, None);
    }
}
