//! What the simulated user wants: each preference is a rule a reply satisfies or not (checked by
//! code, never by a model), what the user says when it does, and the correction it gives when
//! it does not.

/// A built-in preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preference {
    pub name: &'static str,
    /// What the user wants, for reports.
    pub description: &'static str,
    rule: Rule,
    /// Said when a reply satisfies it.
    pub praise: &'static str,
    /// Said when a reply does not (the judge's hint comes from it).
    pub correction: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    MaxWords(usize),
    NoListsOrBold,
    EndsWithQuestion,
    /// None of these phrases (case-insensitive, whole words).
    Without(&'static [&'static str]),
}

pub const PREFERENCES: &[Preference] = &[
    Preference {
        name: "concise",
        description: "replies of at most 60 words",
        rule: Rule::MaxWords(60),
        praise: "Thanks, short and to the point.",
        correction: "Too long. Please answer in at most 60 words.",
    },
    Preference {
        name: "no-lists",
        description: "no markdown lists or bold text, plain sentences",
        rule: Rule::NoListsOrBold,
        praise: "Thanks, easy to read.",
        correction: "Please don't use lists or bold text; answer in plain sentences.",
    },
    Preference {
        name: "ask-back",
        description: "replies that end with a question to the user",
        rule: Rule::EndsWithQuestion,
        praise: "Good question back, thanks.",
        correction: "Please end your answer with a question to me.",
    },
    Preference {
        name: "no-preamble",
        description: "replies that answer at once, without \"Here's ...\" / \"Here is ...\"",
        rule: Rule::Without(&["here's", "here is", "here’s"]),
        praise: "Thanks, straight to the point.",
        correction: "Skip the \"Here's a guide\" preamble; just answer.",
    },
];

pub fn find(name: &str) -> Option<Preference> {
    PREFERENCES.iter().copied().find(|p| p.name == name)
}

/// The names, for error messages and `--help`.
pub fn names() -> String {
    PREFERENCES
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the user says to a reply that repeats itself, whatever it asked for.
pub const LOOP_CORRECTION: &str = "You're repeating yourself. Please answer properly.";

/// Whether a reply loops: at least 30 % of its word trigrams repeat an earlier one. A person
/// does not thank a reply that says the same sentence five times, even if it satisfies the
/// rule (a looping list is short in words for its tokens); the base model's own held-out
/// replies reach it in 2 of 20.
pub fn loops(reply: &str) -> bool {
    super::report::repeated_trigrams([reply]) >= 0.3
}

pub fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// A markdown list item (`- `, `* `, `+ `, `1. `, `2) `) at the start of a line.
fn is_list_item(line: &str) -> bool {
    let l = line.trim_start();
    if let Some(rest) = l.strip_prefix(['-', '*', '+', '•']) {
        return rest.starts_with(' ');
    }
    let digits = l.chars().take_while(|c| c.is_ascii_digit()).count();
    digits > 0 && (l[digits..].starts_with(". ") || l[digits..].starts_with(") "))
}

impl Preference {
    pub fn satisfied_by(&self, reply: &str) -> bool {
        match self.rule {
            Rule::MaxWords(n) => words(reply) <= n,
            Rule::NoListsOrBold => !reply.contains("**") && !reply.lines().any(is_list_item),
            Rule::EndsWithQuestion => reply.trim_end().ends_with('?'),
            Rule::Without(phrases) => {
                let text = format!(" {} ", reply.to_lowercase());
                !phrases.iter().any(|p| {
                    text.match_indices(p).any(|(i, _)| {
                        let before = text[..i].chars().next_back();
                        let after = text[i + p.len()..].chars().next();
                        !before.is_some_and(char::is_alphanumeric)
                            && !after.is_some_and(char::is_alphanumeric)
                    })
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_tells_satisfying_replies_from_the_others() {
        let p = |n| find(n).unwrap();
        assert!(p("concise").satisfied_by("Use fresh beans and water just off the boil."));
        assert!(!p("concise").satisfied_by(&"word ".repeat(61)));
        assert!(p("no-lists").satisfied_by("Grind fresh beans. Use 60 g per litre - not more."));
        assert!(!p("no-lists").satisfied_by("Steps:\n1. Grind\n2. Brew"));
        assert!(!p("no-lists").satisfied_by("Tips:\n- fresh beans"));
        assert!(!p("no-lists").satisfied_by("Use **fresh** beans."));
        assert!(p("ask-back").satisfied_by("Try a French press. Do you have one?  "));
        assert!(!p("ask-back").satisfied_by("Is it hot? Use a kettle."));
        assert!(p("no-preamble").satisfied_by("Use fresh beans; there's no secret."));
        assert!(!p("no-preamble").satisfied_by("Here's a simple guide: use fresh beans."));
        assert!(!p("no-preamble").satisfied_by("Good question. Here is how."));
        assert!(p("no-preamble").satisfied_by("Where is the kettle? Somewhere."));
        assert!(loops(&"Read more books. ".repeat(8)));
        assert!(!loops(
            "Use fresh beans and water just off the boil. Grind them coarse."
        ));
        assert!(find("none").is_none());
        assert!(names().contains("concise"));
    }
}
