//! Reading the summary that coturn's `turnutils_uclient` prints, shared by the tests that drive it.

/// `Total lost packets N (x%)` from uclient's summary.
pub fn lost_packets(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.contains("Total lost packets"))?;
    line.split("Total lost packets")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// uclient's received total, to make sure traffic actually flowed. Progress lines come first;
/// the summary is the last line carrying it.
pub fn received_packets(out: &str) -> Option<u64> {
    let line = out.lines().rev().find(|l| l.contains("tot_recv_msgs="))?;
    line.split("tot_recv_msgs=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
