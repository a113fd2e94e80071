//! The CLI around the commands: shell completions, the manual page, `--color`.

mod common;

use common::Context;

#[test]
fn completions_and_the_manual_page_come_from_the_cli_definition() {
    let ctx = Context::new();
    let bash = ctx.run(&["completions", "bash"]);
    bash.success().stdout_has("_upshift()").stdout_has("rollback");
    ctx.run(&["completions", "zsh"]).success().stdout_has("#compdef upshift");
    ctx.run(&["completions", "fish"]).success().stdout_has("complete -c upshift");
    ctx.run(&["completions", "tcsh"]).code(2).stderr_has("invalid value 'tcsh'");
    let man = ctx.run(&["man"]);
    man.success().stdout_has(".TH upshift 1").stdout_has("upgrade").stdout_has("rollback");
}

#[test]
fn color_is_chosen_by_the_flag_then_no_color() {
    let ctx = Context::new();
    // An error's `error:` prefix is painted when colour is on. `NO_COLOR` is set by the
    // test context; `--color always` wins over it, `auto` honours it.
    let painted = ctx.run(&["--color", "always", "plan", "--to", "1.0.0"]);
    assert!(painted.code(2).stderr.contains("\u{1b}["), "{:?}", painted.stderr);
    let plain = ctx.run(&["--color", "auto", "plan", "--to", "1.0.0"]);
    assert!(!plain.code(2).stderr.contains('\u{1b}'), "{:?}", plain.stderr);
    let never = ctx.run(&["--color", "never", "plan", "--to", "1.0.0"]);
    assert!(!never.code(2).stderr.contains('\u{1b}'), "{:?}", never.stderr);
}
