//! SHA-256 digests of files and streams: the build signature both sides of
//! the proof compute (the supervisor on the snapshot, the worker on itself).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// SHA-256 (lowercase hex) of everything `r` yields.
///
/// # Errors
/// The I/O error of a read.
pub fn sha256_reader(mut r: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    // On the stack, not the heap (see `worker_proc::snapshot`).
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// SHA-256 (lowercase hex) of a file.
///
/// # Errors
/// The I/O error of opening or reading it.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_reader(std::fs::File::open(path)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_digest() {
        assert_eq!(
            super::sha256_reader(&b"abc"[..]).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
