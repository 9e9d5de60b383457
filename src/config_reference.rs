//! The configuration reference, `docs/configuration.md`, rendered from the command-line
//! definitions ([`Cli`]) so that it cannot drift from them: a unit test compares the file
//! with [`render`] and fails, saying how to regenerate it, when they differ.
//!
//! The deployment files are checked against this file (`deploy/validate_consistency.py`),
//! which is how their variable names are held to the code.

use clap::{Arg, CommandFactory};

use crate::cli::Cli;

/// Where the reference lives, relative to the repository root.
pub const PATH: &str = "docs/configuration.md";

/// The command that rewrites [`PATH`] from the code.
pub const REGENERATE: &str = "PGFANOUT_BLESS=1 cargo test --lib config_reference";

/// The whole reference, as Markdown.
pub fn render() -> String {
    let cli = Cli::command();
    let mut out = String::new();
    out.push_str("# Configuration reference\n\n");
    out.push_str(&format!(
        "Generated from pgfanout's command-line definitions; do not edit by hand. After changing an \
         option, `{REGENERATE}` rewrites this file (the unit test `config_reference` fails while it \
         differs from the code).\n\n"
    ));
    out.push_str(
        "Every option is a command-line flag; where the table names an environment variable, the \
         option can be set there instead, and a flag given on the command line wins over it. There \
         is no configuration file. Options without a default and not marked required are off \
         when not given.\n\n",
    );
    out.push_str("## Global options\n\nAccepted by every subcommand.\n\n");
    table(&mut out, cli.get_arguments());
    for command in cli.get_subcommands().filter(|c| !c.is_hide_set()) {
        out.push_str(&format!("\n## `pgfanout {}`\n\n", command.get_name()));
        if let Some(about) = command.get_long_about().or_else(|| command.get_about()) {
            out.push_str(&format!("{}\n\n", sentence(&about.to_string())));
        }
        table(&mut out, command.get_arguments());
    }
    out
}

fn table<'a>(out: &mut String, args: impl Iterator<Item = &'a Arg>) {
    out.push_str("| flag | environment | default | description |\n|---|---|---|---|\n");
    for arg in args.filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version")) {
        out.push_str(&format!("| {} | {} | {} | {} |\n", flags(arg), env(arg), default(arg), description(arg)));
    }
}

fn flags(arg: &Arg) -> String {
    let Some(long) = arg.get_long() else { return format!("`{}`", arg.get_id()) };
    let value = if arg.get_action().takes_values() {
        let names = arg.get_value_names().map(|n| n.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        format!(" <{}>", names.map_or_else(|| arg.get_id().as_str().to_uppercase(), |n| n.join("> <")))
    } else {
        String::new()
    };
    let mut names = vec![format!("`--{long}{value}`")];
    names.extend(arg.get_visible_aliases().unwrap_or_default().into_iter().map(|a| format!("`--{a}`")));
    names.join(", ")
}

fn env(arg: &Arg) -> String {
    arg.get_env().map_or_else(|| "—".to_string(), |e| format!("`{}`", e.to_string_lossy()))
}

fn default(arg: &Arg) -> String {
    if arg.is_required_set() {
        return "required".to_string();
    }
    let values: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
    match values.as_slice() {
        [] => "—".to_string(),
        [v] if v.is_empty() => "empty".to_string(),
        _ => format!("`{}`", values.join(",")),
    }
}

fn description(arg: &Arg) -> String {
    let mut text = arg.get_long_help().or_else(|| arg.get_help()).map(|h| sentence(&h.to_string())).unwrap_or_default();
    if arg.get_action().takes_values() {
        let values: Vec<_> = arg.get_possible_values().into_iter().filter(|v| !v.is_hide_set()).collect();
        if values.iter().any(|v| v.get_help().is_some()) {
            for v in &values {
                let help = v.get_help().map(|h| sentence(&h.to_string())).unwrap_or_default();
                text.push_str(&format!(" `{}`: {help}", v.get_name()));
            }
        } else if !values.is_empty() {
            let names: Vec<String> = values.iter().map(|v| format!("`{}`", v.get_name())).collect();
            text.push_str(&format!(" Values: {}.", names.join(", ")));
        }
    }
    text.replace('|', "\\|")
}

/// Help text as one sentence-ended line, as a Markdown table cell needs it (clap drops the
/// final period of a one-paragraph help).
fn sentence(text: &str) -> String {
    let mut line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if !line.is_empty() && !line.ends_with('.') {
        line.push('.');
    }
    line
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn config_reference_matches_the_code() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PATH);
        let rendered = render();
        if std::env::var("PGFANOUT_BLESS").as_deref() == Ok("1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
            return;
        }
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current != rendered {
            let line = current.lines().zip(rendered.lines()).take_while(|(a, b)| a == b).count() + 1;
            panic!(
                "{PATH} differs from the command-line definitions (first at line {line}: {:?}).\n\
                 Regenerate it with `{REGENERATE}` and commit it.",
                rendered.lines().nth(line - 1).unwrap_or("<end of file>")
            );
        }
    }

    #[test]
    fn config_reference_rows_carry_flag_variable_default_and_values() {
        let text = render();
        for name in ["PGFANOUT_BROKERS", "PGFANOUT_SLOT", "PGFANOUT_DEVICE_STORE", "PGFANOUT_LOG_FORMAT"] {
            assert!(text.contains(&format!("`{name}`")), "{name} missing");
        }
        assert!(text.contains("## `pgfanout capture`"));
        assert!(text.contains("| `--snapshot <SNAPSHOT>` | `PGFANOUT_SNAPSHOT` | `initial` |"), "{text}");
        assert!(text.contains("Values: `text`, `json`."), "{text}");
    }
}
