//! `--config FILE`: settings from a TOML file, for every subcommand.
//!
//! The file is turned into command-line flags before clap sees the command line, so clap
//! stays the only place that knows what a setting means, how it is parsed and validated,
//! and what its default is. A key is a long flag name (`auth-secret`, or `auth_secret`);
//! it is dropped when the same flag is on the command line or its environment variable
//! is set, which gives: flag > environment variable > file > default.
//!
//! Top-level keys apply to the subcommand being run. A table named after a subcommand
//! (`[turn]`, `[sfu]`, ...) applies only to that subcommand and overrides top-level keys,
//! so one file can serve several subcommands. Unknown keys are errors everywhere, also in
//! the tables of subcommands not being run, so a typo is caught on the first start.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "CHORUS_CONFIG";

/// What is wrong with a config file; the message names the file and the key.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    // Boxed so `Result<_, ConfigError>` stays small on the success path.
    pub problem: Box<Problem>,
}

#[derive(Debug)]
pub enum Problem {
    Read(std::io::Error),
    Syntax(String),
    UnknownKey {
        key: String,
        section: Option<String>,
        subcommand: String,
        valid: Vec<String>,
        suggestion: Option<String>,
    },
    BadValue {
        key: String,
        section: Option<String>,
        expected: &'static str,
        found: &'static str,
    },
    Duplicate {
        key: String,
        other: String,
        section: Option<String>,
    },
    ConfigInFile,
}

impl ConfigError {
    fn new(path: &Path, problem: Problem) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            problem: Box::new(problem),
        }
    }
}

fn in_section(section: &Option<String>) -> String {
    match section {
        Some(s) => format!(" in [{s}]"),
        None => String::new(),
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &*self.problem {
            Problem::Read(e) => write!(f, "cannot read config file {path}: {e}"),
            Problem::Syntax(message) => write!(
                f,
                "config file {path} is not valid TOML: {}",
                message.trim_end()
            ),
            Problem::UnknownKey {
                key,
                section,
                subcommand,
                valid,
                suggestion,
            } => {
                write!(
                    f,
                    "config file {path}: unknown key `{key}`{} for `chorus {subcommand}`",
                    in_section(section)
                )?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean `{s}`?)")?;
                }
                write!(f, "; valid keys: {}", valid.join(", "))?;
                if section.is_none() {
                    write!(
                        f,
                        "; a table named after a subcommand ([turn], [sfu], ...) holds keys for that subcommand only"
                    )?;
                }
                Ok(())
            }
            Problem::BadValue {
                key,
                section,
                expected,
                found,
            } => write!(
                f,
                "config file {path}: `{key}`{} must be {expected}, not {found}",
                in_section(section)
            ),
            Problem::Duplicate {
                key,
                other,
                section,
            } => write!(
                f,
                "config file {path}: `{key}` and `{other}`{} set the same flag; keep one",
                in_section(section)
            ),
            Problem::ConfigInFile => write!(
                f,
                "config file {path}: `config` cannot be set inside a config file (use --config or {CONFIG_ENV})"
            ),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &*self.problem {
            Problem::Read(e) => Some(e),
            _ => None,
        }
    }
}

/// `P::parse()` with the config file applied. Exits with a message on a bad file (code
/// 2, as clap does for bad flags) or on clap's own errors.
pub fn parse<P: clap::Parser>() -> P {
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let argv: Vec<OsString> = std::env::args_os().collect();
    let given = argv.len();
    let (argv, path) = match load(&P::command(), argv, env) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    match P::try_parse_from(&argv) {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            // clap's message shows `--listen` where the file said `listen = ...`.
            if let Some(path) = path.filter(|_| e.use_stderr() && argv.len() > given) {
                eprintln!(
                    "note: the settings in {} are passed as --key=value flags, so a flag named above may come from that file",
                    path.display()
                );
            }
            std::process::exit(e.exit_code());
        }
    }
}

/// Finds the config file (`--config` on the command line, else `CHORUS_CONFIG`), reads
/// it and returns `argv` with its settings added, and the file's path. Without a config
/// file, or when help is asked for, `argv` comes back unchanged: a broken file must not
/// hide `--help`.
fn load(
    cmd: &Command,
    argv: Vec<OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Vec<OsString>, Option<PathBuf>), ConfigError> {
    let cmd = built(cmd);
    let Some(scan) = scan(&cmd, &argv) else {
        return Ok((argv, None));
    };
    if scan.help {
        return Ok((argv, None));
    }
    let path = match scan.config {
        Some(p) => PathBuf::from(p),
        None => match env(CONFIG_ENV).filter(|p| !p.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => return Ok((argv, None)),
        },
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| ConfigError::new(&path, Problem::Read(e)))?;
    let argv = apply_config_file(&cmd, argv, env, Some((&path, &text)))?;
    Ok((argv, Some(path)))
}

/// Adds the settings of a config file (`file`: its path, for messages, and its text) to
/// `argv`, right after the subcommand name, as `--flag=value` arguments. `env` answers
/// whether an environment variable is set, so tests need not touch the process's.
pub fn apply_config_file(
    cmd: &Command,
    argv: Vec<OsString>,
    env: impl Fn(&str) -> Option<String>,
    file: Option<(&Path, &str)>,
) -> Result<Vec<OsString>, ConfigError> {
    let Some((path, text)) = file else {
        return Ok(argv);
    };
    let cmd = built(cmd);
    let Some(scan) = scan(&cmd, &argv) else {
        return Ok(argv);
    };
    if scan.help {
        return Ok(argv);
    }
    let table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigError::new(path, Problem::Syntax(e.to_string())))?;
    let running = scan.sub.get_name();
    let mut top = Vec::new();
    let mut sections = Vec::new();
    for (key, value) in &table {
        // A table under a subcommand's name is that subcommand's section; anything else
        // (`signaling = "host:7881"` for `chorus sfu`) is a key of the running one.
        match (value, cmd.find_subcommand(key)) {
            (toml::Value::Table(t), Some(sub)) if !is_help(sub) => sections.push((sub, t)),
            _ => top.push((key, value)),
        }
    }
    let mut settings = settings_for(path, scan.sub, top, None)?;
    for (sub, t) in sections {
        let section = settings_for(path, sub, t.iter().collect(), Some(sub.get_name()))?;
        if sub.get_name() == running {
            settings.extend(section);
        }
    }
    let mut injected = Vec::new();
    for s in settings.values() {
        if scan.on_cli.contains(&s.id) || s.env.as_deref().and_then(&env).is_some() {
            continue;
        }
        injected.extend(s.tokens.iter().cloned());
    }
    let mut argv = argv;
    argv.splice(scan.sub_pos + 1..scan.sub_pos + 1, injected);
    Ok(argv)
}

fn built(cmd: &Command) -> Command {
    // Building fills in each argument's action and copies global flags into the
    // subcommands; before that, a `bool` flag looks like one that takes a value.
    let mut cmd = cmd.clone();
    cmd.build();
    cmd
}

fn is_help(sub: &Command) -> bool {
    sub.get_name() == "help"
}

/// What the command line already says.
struct Scan<'a> {
    sub: &'a Command,
    sub_pos: usize,
    /// Ids of the arguments given as flags.
    on_cli: HashSet<String>,
    config: Option<OsString>,
    help: bool,
}

fn scan<'a>(cmd: &'a Command, argv: &[OsString]) -> Option<Scan<'a>> {
    let mut on_cli = HashSet::new();
    let mut config = None;
    let mut help = false;
    let mut i = 1;
    let (sub, sub_pos) = loop {
        let tok = argv.get(i)?.to_str()?;
        if tok == "--" {
            return None;
        }
        if tok.starts_with('-') && tok.len() > 1 {
            i = note_flag(cmd, argv, i, &mut on_cli, &mut config, &mut help);
            continue;
        }
        break (cmd.find_subcommand(tok)?, i);
    };
    if is_help(sub) {
        help = true;
    }
    i = sub_pos + 1;
    while let Some(tok) = argv.get(i) {
        match tok.to_str() {
            Some("--") => break,
            Some(t) if t.starts_with('-') && t.len() > 1 => {
                i = note_flag(sub, argv, i, &mut on_cli, &mut config, &mut help);
            }
            _ => i += 1,
        }
    }
    Some(Scan {
        sub,
        sub_pos,
        on_cli,
        config,
        help,
    })
}

/// Records the flag at `argv[i]` (`--name`, `--name=v`, `-x`, `-xv`, `-abc`) and returns
/// the index after it and its value. Unknown flags are skipped: clap reports them later.
fn note_flag(
    cmd: &Command,
    argv: &[OsString],
    i: usize,
    on_cli: &mut HashSet<String>,
    config: &mut Option<OsString>,
    help: &mut bool,
) -> usize {
    let tok = argv[i].to_str().unwrap_or_default();
    let mut note = |arg: &Arg, value: Option<OsString>| {
        on_cli.insert(arg.get_id().as_str().to_string());
        if arg.get_id() == "config" {
            *config = value;
        }
        if matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        ) {
            *help = true;
        }
    };
    if let Some(body) = tok.strip_prefix("--") {
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let Some(arg) = cmd.get_arguments().find(|a| {
            a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|al| al.contains(&name))
        }) else {
            return i + 1;
        };
        if arg.get_action().takes_values() && inline.is_none() {
            note(arg, argv.get(i + 1).cloned());
            return i + 2;
        }
        note(arg, inline.map(OsString::from));
        return i + 1;
    }
    let shorts = &tok[1..];
    for (k, ch) in shorts.char_indices() {
        let Some(arg) = cmd.get_arguments().find(|a| {
            a.get_short() == Some(ch) || a.get_all_short_aliases().is_some_and(|s| s.contains(&ch))
        }) else {
            return i + 1;
        };
        if arg.get_action().takes_values() {
            let rest = &shorts[k + ch.len_utf8()..];
            let rest = rest.strip_prefix('=').unwrap_or(rest);
            if rest.is_empty() {
                note(arg, argv.get(i + 1).cloned());
                return i + 2;
            }
            note(arg, Some(OsString::from(rest)));
            return i + 1;
        }
        note(arg, None);
    }
    i + 1
}

/// One key of the file, as the flags it stands for.
struct Setting {
    id: String,
    env: Option<String>,
    tokens: Vec<OsString>,
}

/// Flags that can be set from a file: every flag with a long name that is a switch or
/// takes values, except `--config` itself.
fn configurable(sub: &Command) -> impl Iterator<Item = &Arg> {
    sub.get_arguments().filter(|a| {
        a.get_long().is_some()
            && a.get_id() != "config"
            && matches!(
                a.get_action(),
                ArgAction::Set | ArgAction::Append | ArgAction::SetTrue
            )
    })
}

/// Resolves and type-checks one level of the file (the top level, or one subcommand's
/// table) against `sub`'s flags; keyed by argument id so a section can replace a
/// top-level key.
fn settings_for(
    path: &Path,
    sub: &Command,
    entries: Vec<(&String, &toml::Value)>,
    section: Option<&str>,
) -> Result<BTreeMap<String, Setting>, ConfigError> {
    let section = section.map(str::to_string);
    let mut out = BTreeMap::new();
    let mut spelled: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in entries {
        if key == "config" {
            return Err(ConfigError::new(path, Problem::ConfigInFile));
        }
        let Some(arg) = configurable(sub).find(|a| {
            a.get_long()
                .is_some_and(|l| l == key || l.replace('-', "_") == *key)
        }) else {
            let valid: Vec<String> = {
                let mut v: Vec<String> = configurable(sub)
                    .filter_map(|a| a.get_long().map(str::to_string))
                    .collect();
                v.sort();
                v
            };
            let suggestion = closest(key, &valid);
            return Err(ConfigError::new(
                path,
                Problem::UnknownKey {
                    key: key.clone(),
                    section,
                    subcommand: sub.get_name().to_string(),
                    valid,
                    suggestion,
                },
            ));
        };
        let id = arg.get_id().as_str().to_string();
        if let Some(other) = spelled.insert(id.clone(), key.clone()) {
            return Err(ConfigError::new(
                path,
                Problem::Duplicate {
                    key: other,
                    other: key.clone(),
                    section,
                },
            ));
        }
        let bad = |expected, found| {
            ConfigError::new(
                path,
                Problem::BadValue {
                    key: key.clone(),
                    section: section.clone(),
                    expected,
                    found,
                },
            )
        };
        let long = arg.get_long().unwrap_or(key);
        let flag_with = |v: String| OsString::from(format!("--{long}={v}"));
        // `--flag=value` rather than `--flag value`: a value that starts with `-` would
        // otherwise be read as a flag.
        let tokens = match arg.get_action() {
            ArgAction::SetTrue => match value {
                toml::Value::Boolean(true) => vec![OsString::from(format!("--{long}"))],
                toml::Value::Boolean(false) => vec![],
                other => return Err(bad("true or false (a switch)", describe(other))),
            },
            ArgAction::Append => match value {
                toml::Value::Array(items) => {
                    let mut t = Vec::with_capacity(items.len());
                    for item in items {
                        match scalar(item) {
                            Some(s) => t.push(flag_with(s)),
                            None => {
                                return Err(bad(
                                    "a value or a list of strings or numbers",
                                    list_of(item),
                                ))
                            }
                        }
                    }
                    t
                }
                other => match scalar(other) {
                    Some(s) => vec![flag_with(s)],
                    None => return Err(bad("a string, a number or a list", describe(other))),
                },
            },
            _ => match scalar(value) {
                Some(s) => vec![flag_with(s)],
                None => return Err(bad("a single string or number", describe(value))),
            },
        };
        out.insert(
            id.clone(),
            Setting {
                id,
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                tokens,
            },
        );
    }
    Ok(out)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(x) => Some(x.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

fn describe(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn list_of(item: &toml::Value) -> &'static str {
    match item {
        toml::Value::Array(_) => "a list containing an array",
        _ => "a list containing a table",
    }
}

/// The valid key nearest to a misspelt one, if it is close (edit distance ≤ 2).
fn closest(key: &str, valid: &[String]) -> Option<String> {
    let key = key.replace('_', "-");
    valid
        .iter()
        .map(|v| (edit_distance(&key, v), v))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command as Sub};
    use clap::{CommandFactory, Parser};

    const PATH: &str = "/etc/chorus/test.toml";

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("chorus")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn apply_with(
        args: &[&str],
        env: impl Fn(&str) -> Option<String>,
        text: &str,
    ) -> Result<Vec<OsString>, ConfigError> {
        apply_config_file(
            &Cli::command(),
            argv(args),
            env,
            Some((Path::new(PATH), text)),
        )
    }

    fn apply(args: &[&str], text: &str) -> Result<Vec<OsString>, ConfigError> {
        apply_with(args, no_env, text)
    }

    fn strings(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    fn turn_args(v: Vec<OsString>) -> chorus_turn::TurnArgs {
        match Cli::try_parse_from(v)
            .expect("clap accepts the result")
            .command
        {
            Sub::Turn(a) => a,
            _ => panic!("not the turn subcommand"),
        }
    }

    #[test]
    fn file_values_become_flags_after_the_subcommand() {
        let out = apply(
            &["turn"],
            "listen = \"127.0.0.1:4000\"\nrealm = \"example.org\"\nmax_bps = 64000\n",
        )
        .unwrap();
        assert_eq!(out[1], "turn");
        assert!(strings(&out).contains(&"--listen=127.0.0.1:4000".to_string()));
        let a = turn_args(out);
        assert_eq!(a.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(a.realm, "example.org");
        assert_eq!(a.max_bps, Some(64000));
    }

    #[test]
    fn environment_variable_beats_the_file() {
        let env = |name: &str| (name == "CHORUS_TURN_LISTEN").then(|| "127.0.0.1:9".to_string());
        let out = apply_with(
            &["turn"],
            env,
            "listen = \"127.0.0.1:4000\"\nrealm = \"r\"\n",
        )
        .unwrap();
        let s = strings(&out);
        assert!(!s.iter().any(|t| t.starts_with("--listen")), "{s:?}");
        assert!(s.contains(&"--realm=r".to_string()));
    }

    #[test]
    fn command_line_flag_beats_the_file_in_every_spelling() {
        for args in [
            &["turn", "--listen", "127.0.0.1:5000"][..],
            &["turn", "--listen=127.0.0.1:5000"][..],
        ] {
            let out = apply(args, "listen = \"127.0.0.1:4000\"\nrealm = \"r\"\n").unwrap();
            let s = strings(&out);
            assert_eq!(
                s.iter().filter(|t| t.starts_with("--listen")).count(),
                1,
                "{s:?}"
            );
            let a = turn_args(out);
            assert_eq!(a.listen, "127.0.0.1:5000".parse().unwrap());
            assert_eq!(a.realm, "r");
        }
        // A value that looks like a flag name is a value, not that flag.
        let out = apply(
            &["turn", "--realm", "--listen"],
            "listen = \"127.0.0.1:4000\"\n",
        )
        .unwrap();
        assert!(strings(&out).contains(&"--listen=127.0.0.1:4000".to_string()));
    }

    #[test]
    fn booleans_switch_flags_on_and_false_leaves_them_off() {
        let a = turn_args(apply(&["turn"], "allow-loopback-peers = true\n").unwrap());
        assert!(a.allow_loopback_peers);
        let out = apply(&["turn"], "allow-loopback-peers = false\n").unwrap();
        assert_eq!(out, argv(&["turn"]));
        let e = apply(&["turn"], "allow-loopback-peers = \"yes\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("`allow-loopback-peers` must be true or false"),
            "{e}"
        );
    }

    #[test]
    fn arrays_repeat_the_flag() {
        let out = apply(&["turn"], "user = [\"ana:pw1\", \"bo:pw2\"]\n").unwrap();
        assert_eq!(
            strings(&out)[2..],
            ["--user=ana:pw1".to_string(), "--user=bo:pw2".to_string()]
        );
        assert_eq!(turn_args(out).users, ["ana:pw1", "bo:pw2"]);
        let a = turn_args(apply(&["turn"], "user = \"solo:pw\"\n").unwrap());
        assert_eq!(a.users, ["solo:pw"]);
        // The command line replaces the list; it is not merged with it.
        let a = turn_args(apply(&["turn", "--user", "cli:pw"], "user = [\"ana:pw1\"]\n").unwrap());
        assert_eq!(a.users, ["cli:pw"]);
    }

    #[test]
    fn unknown_key_names_the_key_and_lists_the_valid_ones() {
        let e = apply(&["turn"], "lissten = \"127.0.0.1:4000\"\n").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("unknown key `lissten`"), "{m}");
        assert!(m.contains(PATH), "{m}");
        assert!(m.contains("did you mean `listen`?"), "{m}");
        assert!(
            m.contains("valid keys: allow-loopback-peers, auth-secret,"),
            "{m}"
        );
        assert!(!m.contains("help"), "{m}");
    }

    #[test]
    fn wrong_value_types_are_errors() {
        let e = apply(&["turn"], "[listen]\nport = 1\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("config file {PATH}: `listen` must be a single string or number, not a table")
        );
        let e = apply(&["turn"], "realm = [\"a\", \"b\"]\n").unwrap_err();
        assert!(e.to_string().contains("not an array"), "{e}");
        let e = apply(&["turn"], "user = [[\"a\"]]\n").unwrap_err();
        assert!(e.to_string().contains("`user`"), "{e}");
        // Right type, wrong content: clap's own message, as for a flag.
        let out = apply(&["turn"], "listen = \"nowhere\"\n").unwrap();
        assert!(Cli::try_parse_from(out).is_err());
    }

    #[test]
    fn toml_syntax_error_names_the_file() {
        let e = apply(&["turn"], "listen = \n").unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with(&format!("config file {PATH} is not valid TOML")),
            "{m}"
        );
        assert!(m.contains("line 1"), "{m}");
    }

    #[test]
    fn both_spellings_of_a_key_and_config_itself_are_refused() {
        let a = turn_args(apply(&["turn"], "auth_secret = \"s3cret-s3cret\"\n").unwrap());
        assert_eq!(a.auth_secret.as_deref(), Some("s3cret-s3cret"));
        let e = apply(&["turn"], "auth_secret = \"a\"\nauth-secret = \"b\"\n").unwrap_err();
        assert!(e.to_string().contains("set the same flag"), "{e}");
        let e = apply(&["turn"], "config = \"other.toml\"\n").unwrap_err();
        assert!(e.to_string().contains("`config` cannot be set"), "{e}");
    }

    #[test]
    fn subcommand_tables_serve_one_subcommand_and_override_top_level_keys() {
        let text = "log-json = true\n\
                    [turn]\nrealm = \"turn.example.org\"\n\
                    [sfu]\nworkers = 4\nsignaling = \"10.0.0.2:7881\"\n\
                    [signaling]\nlisten = \"0.0.0.0:7880\"\n";
        let out = apply(&["turn"], text).unwrap();
        let s = strings(&out);
        assert!(s.contains(&"--log-json".to_string()), "{s:?}");
        assert!(s.contains(&"--realm=turn.example.org".to_string()), "{s:?}");
        assert!(
            !s.iter()
                .any(|t| t.contains("workers") || t.contains("7880")),
            "{s:?}"
        );
        let cli = Cli::try_parse_from(out).unwrap();
        assert!(cli.log_json);

        let a =
            turn_args(apply(&["turn"], "realm = \"top\"\n[turn]\nrealm = \"section\"\n").unwrap());
        assert_eq!(a.realm, "section");

        // A typo in another subcommand's table is still caught.
        let e = apply(&["turn"], "[sfu]\nworkerz = 4\n").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("unknown key `workerz` in [sfu] for `chorus sfu`"),
            "{m}"
        );
    }

    #[test]
    fn global_flags_before_the_subcommand_count_as_given() {
        let out = apply(&["--log-json", "turn"], "log-json = true\n").unwrap();
        assert_eq!(out, argv(&["--log-json", "turn"]));
    }

    #[test]
    fn values_starting_with_a_dash_stay_values() {
        let a = turn_args(apply(&["turn"], "realm = \"-odd-\"\n").unwrap());
        assert_eq!(a.realm, "-odd-");
    }

    #[test]
    fn help_is_never_blocked_by_a_broken_file() {
        for args in [
            &["turn", "--help"][..],
            &["turn", "-h"][..],
            &["help", "turn"][..],
        ] {
            let out = apply(args, "this is not toml").unwrap();
            assert_eq!(out, argv(args));
        }
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let e = load(
            &Cli::command(),
            argv(&["turn", "--config", "/nonexistent/chorus.toml"]),
            no_env,
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("cannot read config file /nonexistent/chorus.toml:"),
            "{m}"
        );
    }

    fn example_path(name: &str) -> String {
        format!("{}/deploy/config/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn config_file_named_by_the_environment_is_read() {
        let path = example_path("turn.toml");
        let env = |name: &str| (name == CONFIG_ENV).then(|| path.clone());
        let (out, path) = load(&Cli::command(), argv(&["turn"]), env).unwrap();
        assert_eq!(path, Some(PathBuf::from(example_path("turn.toml"))));
        assert!(out.len() > 2, "{out:?}");
        turn_args(out);
    }

    /// The example files with their commented-out `# key = value` lines switched on, so
    /// those keys are checked against the flags too.
    fn uncommented(text: &str) -> String {
        text.lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty()
                            && k.chars()
                                .all(|c| c.is_ascii_lowercase() || c == '-' || c == '_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn example_configs_match_the_flags() {
        let examples = [
            ("turn", include_str!("../deploy/config/turn.toml")),
            ("signaling", include_str!("../deploy/config/signaling.toml")),
            ("sfu", include_str!("../deploy/config/sfu.toml")),
        ];
        for (sub, text) in examples {
            let as_shipped = apply(&[sub], text).unwrap_or_else(|e| panic!("{sub}: {e}"));
            assert!(as_shipped.len() > 4, "{sub}: {as_shipped:?}");
            let full = uncommented(text);
            assert_ne!(full, text, "{sub}: expected commented-out secrets");
            let out = apply(&[sub], &full).unwrap_or_else(|e| panic!("{sub}: {e}"));
            match Cli::try_parse_from(&out) {
                Err(e) => panic!("{sub}: clap refuses {out:?}: {e}"),
                Ok(Cli {
                    command: Sub::Turn(a),
                    ..
                }) => {
                    if let Err(e) = chorus_turn::config_from_args(&a) {
                        panic!("{sub}: the relay refuses {out:?}: {e}");
                    }
                }
                Ok(_) => {}
            }
        }
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("lissten", "listen"), 1);
        assert_eq!(edit_distance("relm", "realm"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
