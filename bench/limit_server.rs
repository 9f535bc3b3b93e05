//! The limit harness for `bench/run`: the least a server must do for an ensure request
//! (read the Bearer token, verify HS256, XADD one entry) and nothing more. ensure-user is
//! measured against it in the same run. To be written by the benchmark work.

fn main() {
    eprintln!("limit-server: not written yet");
    std::process::exit(1);
}
