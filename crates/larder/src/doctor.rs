//! `larder doctor [CACHE]`: prints the checks of [`larder_ops::doctor`] (`ok`, `warn` or
//! `fail` with what each saw and, when not ok, the fix), or their JSON; any `fail` exits 1.

use larder_ops::doctor::{self, Check};

use crate::client_config::connect;
use crate::output::{fail_with_hint, print, print_json};

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE): also check that Nix is set up to substitute from it.
    cache: Option<String>,
    /// Print the checks as a JSON array of {check, status, detail, fix}.
    #[arg(long)]
    json: bool,
}

pub async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    // A cache named by its URL, by `SERVER:CACHE` or on the default server.
    let connected = match args.cache.as_deref() {
        Some(a) => crate::client_config::target(a).map(|t| (t.client, Some(t.cache))),
        None => connect(None).map(|c| (c, None)),
    };
    let r = doctor::run_checks(doctor::Target {
        connected: connected.map_err(|e| format!("{e:#}")),
        cache_arg: args.cache.clone(),
    })
    .await;
    if args.json {
        print_json(&r.0)?;
    } else {
        print(&render(&r.0))?;
    }
    let failed = r.failed();
    if failed > 0 {
        return Err(fail_with_hint(
            format!("{failed} of {} checks failed", r.0.len()),
            "apply the fixes above, then run `larder doctor` again",
        ));
    }
    Ok(())
}

/// The checklist as lines: status, check, what it saw, and the fix below it.
fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = c.status.as_str();
        out.push_str(&format!("{tag:<5} {:<20} {}\n", c.check, c.detail));
        if let Some(fix) = &c.fix {
            for (i, line) in fix.lines().enumerate() {
                let lead = if i == 0 { "fix: " } else { "     " };
                out.push_str(&format!("{:27}{lead}{line}\n", ""));
            }
        }
    }
    out
}
