//! The container log driver alone (`container-log <log path>`), for the provider's own tests:
//! the agent runs the same code as `wasm-kubelet container-log` (see `log_driver`).

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1) {
        Some(sub) if sub == provider_containerd::log_driver::SUBCOMMAND => {
            provider_containerd::log_driver::main(&args[2..])
        }
        _ => {
            eprintln!(
                "usage: container-log {} <log path>",
                provider_containerd::log_driver::SUBCOMMAND
            );
            std::process::ExitCode::from(2)
        }
    }
}
