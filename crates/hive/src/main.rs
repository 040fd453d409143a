//! `hive`: the command line. It parses arguments and calls the library crates; the server,
//! the CLI and the tests share one code path through [`hive_client`] and [`hive_server`].

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The container supervisor forks: it must run before any other thread exists. It is on
    // every container start's path, so it is told from its two arguments directly, without
    // building the whole command line's parser first (~0.5 ms of a start).
    let mut argv = std::env::args_os().skip(1);
    if let (Some(verb), Some(config), None) = (argv.next(), argv.next(), argv.next())
        && verb == "shim"
        && let Some(config) = config.to_str()
    {
        return shim(config);
    }
    let args = cli::Cli::parse();
    if let cli::Command::Shim { shim_config } = &args.command {
        return shim(shim_config);
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

fn shim(config: &str) -> ExitCode {
    ExitCode::from(hive_agent::runtime::shim::main(config).clamp(0, 255) as u8)
}
