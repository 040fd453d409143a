//! `hive`: the command line. It parses arguments and calls the library crates; the server,
//! the CLI and the tests share one code path through [`hive_client`] and [`hive_server`].

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The container supervisor forks: it must run before any other thread exists. It is on
    // every container start's path, so it is told from its two or three arguments directly,
    // without building the whole command line's parser first (~0.5 ms of a start).
    let mut argv = std::env::args_os().skip(1);
    if let (Some(verb), Some(config), runtime, None) =
        (argv.next(), argv.next(), argv.next(), argv.next())
        && verb == "shim"
        && let Some(config) = config.to_str()
    {
        return shim(config, runtime.as_deref().map(std::path::Path::new));
    }
    let args = cli::Cli::parse();
    if let cli::Command::Shim {
        shim_config,
        runtime,
    } = &args.command
    {
        return shim(shim_config, runtime.as_deref());
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

fn shim(config: &str, runtime: Option<&std::path::Path>) -> ExitCode {
    ExitCode::from(hive_agent::runtime::shim::main(config, runtime).clamp(0, 255) as u8)
}
