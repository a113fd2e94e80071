//! The `notes` binary: all of it is [`notes::main`].

fn main() -> std::process::ExitCode {
    notes::main()
}
