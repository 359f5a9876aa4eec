//! Test support shared by this crate's tests and the workspace's integration tests: a
//! throwaway `redis-server` on a free loopback port. Not part of the API.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` process with no persistence, stopped when dropped.
pub struct RedisServer {
    child: Child,
    pub addr: SocketAddr,
}

impl RedisServer {
    /// Starts one, or returns `None` after a loud message when `redis-server` is not
    /// installed, so a developer machine without it still runs the other tests. Set
    /// `CHORUS_REQUIRE_REDIS=1` (the CI test script does) to make that a failure.
    pub fn start() -> Option<RedisServer> {
        let required = std::env::var("CHORUS_REQUIRE_REDIS").is_ok_and(|v| v == "1");
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                !required,
                "redis-server is not installed but CHORUS_REQUIRE_REDIS=1 (apt-get install redis-server)"
            );
            eprintln!(
                "\n!!! SKIPPING the Redis half of this test: redis-server is not installed \
                 (apt-get install redis-server; CI installs it) !!!\n"
            );
            return None;
        }
        // Several tries: another process may take the port between our probe and
        // redis-server's bind.
        for _ in 0..5 {
            let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
                Ok(a) => a.port(),
                Err(e) => panic!("no free port for redis-server: {e}"),
            };
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting redis-server");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect(addr).is_ok() {
                    return Some(RedisServer { child, addr });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Stops the server (as an outage would); [`RedisServer::restart`] brings it back on
    /// the same port, empty.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.stop();
        let port = self.addr.port().to_string();
        self.child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restarting redis-server");
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(self.addr).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not restart");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
