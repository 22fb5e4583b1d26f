//! The `shadow2` command line: one file per subcommand, dispatched from here.

mod check_shadow;
mod check_walker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Shadow page tables after Xen's Shadow2: run, check, measure.
#[derive(Debug, Parser)]
#[command(name = "shadow2", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a part of the system against its oracle.
    Check {
        #[command(subcommand)]
        target: CheckTarget,
    },
}

#[derive(Debug, Subcommand)]
enum CheckTarget {
    /// Check the architectural page walker against the SDM rules over the access matrix.
    Walker(check_walker::Args),
    /// Check the shadow engine on the simulator: random page-table churn, audit after
    /// every step, oracle on every access.
    Shadow(check_shadow::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check {
            target: CheckTarget::Walker(args),
        } => check_walker::run(&args),
        Command::Check {
            target: CheckTarget::Shadow(args),
        } => check_shadow::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shadow2: {e}");
            ExitCode::FAILURE
        }
    }
}
