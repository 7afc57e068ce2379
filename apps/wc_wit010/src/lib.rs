//! Word count built against `mr:app@0.1.0` (its WIT is kept in `wit/`, as
//! an app built before 0.1.1 has it), straight on the generated bindings:
//! the test that apps built for 0.1.0 keep running on a host of 0.1.1.
//! Words are maximal runs of ASCII letters (the tests give it ASCII text);
//! no combiner.

mod bindings {
    wit_bindgen::generate!({ path: "wit", world: "mr:app/mapreduce" });
}

use bindings::mr::app::host::emit;
use bindings::mr::app::types::{Group, Kv};

struct Wc;

impl bindings::Guest for Wc {
    fn map(_input: String, contents: String) -> Result<(), String> {
        let mut batch = Vec::new();
        for w in contents
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
        {
            batch.push(Kv {
                key: w.into(),
                value: "1".into(),
            });
            if batch.len() == 4096 {
                emit(&batch);
                batch.clear();
            }
        }
        emit(&batch);
        Ok(())
    }

    fn reduce(groups: Vec<Group>) -> Result<Vec<String>, String> {
        // Keys with many values may come in several groups (last = false
        // on all but the final one): sum across them.
        thread_local!(static CARRY: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
        let mut out = Vec::new();
        for g in groups {
            let n: u64 = g.values.iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum();
            let total = CARRY.with(|c| c.replace(0)) + n;
            if g.last {
                out.push(total.to_string());
            } else {
                CARRY.with(|c| c.set(total));
            }
        }
        Ok(out)
    }

    fn combine(_groups: Vec<Group>) -> Result<Option<Vec<String>>, String> {
        Ok(None)
    }
}

bindings::export!(Wc with_types_in bindings);
