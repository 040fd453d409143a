//! `hive`: the command line. It parses arguments and calls the library crates; the server,
//! the CLI and the tests share one code path through [`hive_client`] and [`hive_server`].

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // The container supervisor forks: it must run before any other thread exists.
    if let cli::Command::Shim { shim_config } = &args.command {
        return ExitCode::from(hive_agent::runtime::shim::main(shim_config).clamp(0, 255) as u8);
    }
    cli::init_tracing(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(args));
    // A read of stdin (hive exec -i) may still be blocked: do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `hive exec` passes the process's exit code on; `hive rm` printed its failures.
        Err(e) if e.downcast_ref::<cli::workload::ExitWith>().is_some() => {
            let code = e
                .downcast_ref::<cli::workload::ExitWith>()
                .map_or(1, |c| c.0);
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
