//! The Janus process of a run: a fresh Janus 1.x with a private configuration (the
//! VideoRoom plugin and the WebSocket transport only), and the address its media uses.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// Where Debian/Ubuntu and a source build put Janus's plugins and transports.
const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/janus",
    "/usr/lib/aarch64-linux-gnu/janus",
    "/usr/lib/janus",
    "/usr/local/lib/janus",
    "/opt/janus/lib/janus",
];

/// How to start Janus.
pub struct JanusOptions {
    /// The binary: a name on PATH or a path.
    pub bin: String,
    /// `event_loops`: 0 is a thread per PeerConnection (Janus's default).
    pub event_loops: usize,
    /// Janus's log level (0–7); 2 is errors only, so logging costs no CPU.
    pub debug_level: u8,
    /// Where Janus's output goes (default: its temporary config directory).
    pub log: Option<PathBuf>,
    /// The address Janus gathers ICE candidates on (and the peers bind to).
    pub ip: Ipv4Addr,
}

/// A Janus process started for one run, with its own config directory.
pub struct JanusServer {
    child: Child,
    pub url: String,
    dir: PathBuf,
}

impl JanusServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for JanusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The machine's own (non-loopback) IPv4 address, from the kernel's routing view (a
/// connected UDP socket sends nothing).
///
/// Janus needs one for media: 1.1.2 never gathers ICE candidates on loopback
/// interfaces (`ice.c` skips `IFF_LOOPBACK`), and libnice pins each media socket to
/// its interface (`IP_UNICAST_IF`), so a packet from Janus to 127.0.0.1 would be
/// routed out of that interface to the gateway. So for Janus runs both Janus and the
/// simulated participants use this address: traffic between two local addresses
/// never leaves the machine (Linux delivers it through `lo`).
pub fn local_ipv4() -> anyhow::Result<Ipv4Addr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // Any routable address works; nothing is sent.
    s.connect("192.0.2.1:9").context(
        "no non-loopback IPv4 route: Janus needs an address besides lo for ICE (see --janus-ip)",
    )?;
    match s.local_addr()?.ip() {
        IpAddr::V4(a) if !a.is_loopback() && !a.is_unspecified() => Ok(a),
        other => bail!(
            "no non-loopback IPv4 address (got {other}): Janus never uses lo for ICE (see --janus-ip)"
        ),
    }
}

/// Starts Janus with a minimal configuration: the VideoRoom plugin and the WebSocket
/// transport only (on 127.0.0.1), no event handlers or loggers, errors-only logging,
/// ICE restricted to one local address (`opts.ip`).
pub fn start(opts: &JanusOptions) -> anyhow::Result<JanusServer> {
    let bin = opts.bin.as_str();
    let bin = find_on_path(bin).ok_or_else(|| {
        anyhow!(
            "`{bin}` not found: install Janus with `apt-get install janus` (or pass --janus-bin)"
        )
    })?;
    let lib = LIB_DIRS
        .iter()
        .map(Path::new)
        .find(|d| d.join("plugins/libjanus_videoroom.so").is_file())
        .ok_or_else(|| {
            anyhow!(
                "Janus's VideoRoom plugin not found in {}: install it with `apt-get install janus`",
                LIB_DIRS.join(", ")
            )
        })?;
    let ice_ip = opts.ip;
    let dir = std::env::temp_dir().join(format!("chorus-loadgen-janus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["plugins", "transports", "none"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    // Folders holding only what this run loads: Janus loads every plugin and
    // transport it finds, each with its own threads and ports.
    std::os::unix::fs::symlink(
        lib.join("plugins/libjanus_videoroom.so"),
        dir.join("plugins/libjanus_videoroom.so"),
    )?;
    std::os::unix::fs::symlink(
        lib.join("transports/libjanus_websockets.so"),
        dir.join("transports/libjanus_websockets.so"),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let d = dir.display();
    let (debug_level, event_loops) = (opts.debug_level, opts.event_loops);
    // libnice's own log too at the top level (for ICE trouble).
    let nice_debug = debug_level >= 7;
    std::fs::write(
        dir.join("janus.jcfg"),
        format!(
            r#"general: {{
	configs_folder = "{d}"
	plugins_folder = "{d}/plugins"
	transports_folder = "{d}/transports"
	events_folder = "{d}/none"
	loggers_folder = "{d}/none"
	debug_level = {debug_level}
	session_timeout = 60
	event_loops = {event_loops}
}}
media: {{
}}
nat: {{
	nice_debug = {nice_debug}
	ice_enforce_list = "{ice_ip}"
}}
plugins: {{
}}
transports: {{
}}
loggers: {{
}}
events: {{
	broadcast = false
}}
"#
        ),
    )?;
    std::fs::write(
        dir.join("janus.transport.websockets.jcfg"),
        format!(
            r#"general: {{
	json = "compact"
	ws = true
	ws_port = {port}
	ws_ip = "127.0.0.1"
	wss = false
}}
admin: {{
	admin_ws = false
	admin_wss = false
}}
"#
        ),
    )?;
    // No static rooms: the runner creates the scenario's rooms over the API.
    std::fs::write(dir.join("janus.plugin.videoroom.jcfg"), "general: {\n}\n")?;
    let log = opts.log.clone().unwrap_or_else(|| dir.join("janus.log"));
    let out = File::create(&log)?;
    let child = Command::new(&bin)
        .arg("-C")
        .arg(dir.join("janus.jcfg"))
        .arg("-F")
        .arg(&dir)
        .arg("--disable-colors")
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut server = JanusServer {
        child,
        url: format!("ws://127.0.0.1:{port}"),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(server);
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("janus exited ({status}) before listening; its log:\n{tail}");
        }
        if Instant::now() > deadline {
            bail!("janus did not listen on port {port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
