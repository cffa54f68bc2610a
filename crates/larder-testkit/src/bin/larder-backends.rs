//! Start a throwaway PostgreSQL cluster and a single-node Garage on loopback (the same ones the
//! tests use), print the settings a scaled-out `larder serve` needs, and keep both running
//! until standard input closes; then tear them down. Used by `bench/serve.sh`.
//!
//! Output, one `NAME=value` per line (shell-sourceable): `LARDER_DATABASE`, `LARDER_STORAGE`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`.
#![allow(clippy::unwrap_used)] // a benchmark helper: a panic says what failed

use std::io::{Read, Write};

use larder_testkit::garage::Garage;
use larder_testkit::postgres::PgCluster;

fn main() {
    let pg = PgCluster::start();
    let database = pg.create_database();
    let garage = Garage::start();
    let mut out = std::io::stdout().lock();
    writeln!(out, "LARDER_DATABASE='{database}'").unwrap();
    writeln!(out, "LARDER_STORAGE='{}'", garage.storage_url()).unwrap();
    for (k, v) in garage.env() {
        writeln!(out, "{k}='{v}'").unwrap();
    }
    out.flush().unwrap();
    drop(out);
    // Until whoever started us closes our stdin (or exits).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(garage);
    drop(pg);
}
