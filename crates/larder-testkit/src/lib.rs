//! Test harnesses of larder, for tests only: real backend servers, started by the tests
//! themselves on loopback in temporary directories. A missing server binary fails the test
//! with a message saying how to install it (`.ci/run` does); nothing is mocked.

pub mod garage;
