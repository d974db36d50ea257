//! Feeds arbitrary text to the terminal stream's parameter parser (it comes from the server)
//! and to the passwd(5) reader: a value or an error, never a panic, and whatever parses is
//! within the documented limits.
#![no_main]

use atrium_agent::terminal::{find_account, parse_params};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(params) = parse_params(text) {
        assert!((1..=1000).contains(&params.cols) && (1..=1000).contains(&params.rows));
        assert!(params.term.is_none_or(|t| !t.is_empty() && t.len() <= 64));
    }
    let (name, passwd) = text.split_once('\n').unwrap_or(("root", text));
    if let Some(account) = find_account(passwd, name) {
        assert_eq!(account.name, name);
    }
});
