//! The lab's `nocrash`: per input, `a` = its name, `b` = the name's length,
//! `c` = the contents' length in bytes, `d` = `xyzzy`; reduce joins the
//! sorted values with spaces. The reference output for `crash`.
use mr_sdk::{App, Emitter};

struct NoCrash;

impl App for NoCrash {
    fn map(input: &str, contents: &str, out: &mut Emitter) {
        out.emit("a", input);
        out.emit("b", &input.len().to_string());
        out.emit("c", &contents.len().to_string());
        out.emit("d", "xyzzy");
    }

    fn reduce(_key: &str, values: &[&str]) -> String {
        let mut sorted = values.to_vec();
        sorted.sort();
        sorted.join(" ")
    }
}

mr_sdk::export_app!(NoCrash);
