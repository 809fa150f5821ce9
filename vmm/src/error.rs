//! Errors as people and supervisors read them: an error and its causes, one line each.

/// An error and its causes, outermost first.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect()
}

/// An error and its causes as one line, `": "` between them.
pub fn message(e: &(dyn std::error::Error + 'static)) -> String {
    chain(e).join(": ")
}
