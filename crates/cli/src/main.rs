//! The `shadow2` command line: one file per subcommand, dispatched from here.

mod bench;
mod bench_kvm;
mod check_shadow;
mod check_walker;
mod goals;
mod kvm_cmd;
mod kvmrun;
mod memdiff;
mod native;
mod progress;
mod replay;
mod report;
mod result;
mod run;
mod simrun;

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
    /// Run a workload: a guest OS model on a paging pair and backend.
    Run(run::Args),
    /// Run every workload on every pair each guest model supports, and measure.
    Bench(bench::Args),
    /// Run a recorded trace again and check every counter comes out the same.
    Replay(replay::Args),
    /// Draw what `shadow2 bench` measured: SVG plots and a Markdown summary.
    Report(report::Args),
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
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Report(args) => report::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shadow2: {e}");
            ExitCode::FAILURE
        }
    }
}
