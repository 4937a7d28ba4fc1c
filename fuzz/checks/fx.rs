//! The FX table: arbitrary bytes as CSV to `FxTable::from_csv`, and a table that loads answers
//! every pair it holds, both ways, on every day it names and the days around them. Errors are
//! fine, panics are not.

use revpilot_core::{FxRates, FxTable};

/// One input, as the `fx` target and the regression replay run it.
pub(crate) fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = FxTable::from_csv(text) else {
        return;
    };
    // The rows again, as `from_csv` read them, to ask the table about each.
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [date, from, to, _] = fields[..] else {
            continue;
        };
        let (Ok(day), Ok(from), Ok(to)) = (
            chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d"),
            revpilot_core::Currency::parse(from),
            revpilot_core::Currency::parse(to),
        ) else {
            continue;
        };
        for day in [day.pred_opt(), Some(day), day.succ_opt()]
            .into_iter()
            .flatten()
        {
            let _ = table.rate(from, to, day);
            let _ = table.rate(to, from, day);
        }
    }
}
