//! What a run found, and its files: report.md (the numbers), interactions.csv, rewards.png
//! and eval.jsonl (every held-out reply).

use super::preference::{self, Preference};
use super::report::{self, Interaction, JudgeSummary};
use super::{Evaluated, SimArgs, SimMethod, Versions, plot, proportion};
use anyhow::Result;
use serde_json::json;
use std::fmt::Write as _;
use std::path::Path;

pub(super) struct Outcome<'a> {
    pub args: &'a SimArgs,
    pub pref: &'a Preference,
    /// The held-out replies before the run, at each `--eval-every` check, and after it.
    pub before: Vec<Evaluated>,
    /// The base model's held-out replies with the user's correction as the teacher's hint.
    pub teacher: Vec<Evaluated>,
    pub checked: Vec<(String, Vec<Evaluated>)>,
    pub after: Vec<Evaluated>,
    /// (after interaction, held-out replies not preferred) at each check.
    pub checkpoints: Vec<(usize, usize)>,
    pub rows: Vec<Interaction>,
    pub versions: Versions,
    /// How the judge and trainer ended.
    pub settled: String,
    pub judge: Option<JudgeSummary>,
    /// How many distinct corrections the user made.
    pub corrections: usize,
    /// Rollback to v0: (held-out replies identical to before, of how many).
    pub rollback: Option<(usize, usize)>,
    pub wall_secs: f64,
}

impl Outcome<'_> {
    /// Writes the run's files to `out` and prints the report.
    pub fn write(&self, out: &Path) -> Result<()> {
        let text = self.report();
        std::fs::write(out.join("report.md"), &text)?;
        std::fs::write(out.join("interactions.csv"), report::csv(&self.rows, 10))?;
        let (args, pref) = (self.args, self.pref);
        let title = format!(
            "{} · {} · seed {}",
            pref.name,
            args.method.name(),
            args.seed
        );
        match plot::reward_curve(&out.join("rewards.png"), &self.rows, 10, &title) {
            Ok(true) => {}
            Ok(false) => eprintln!("rewards.png has no labels: no font found (set CLAWRL_FONT)"),
            Err(e) => eprintln!("rewards.png not written: {e:#}"),
        }
        std::fs::write(out.join("eval.jsonl"), self.eval_lines())?;
        print!("{text}");
        println!("- files: {}", out.display());
        Ok(())
    }

    /// report.md: the held-out rule before and after, the run, the training, the settings.
    fn report(&self) -> String {
        let (args, pref) = (self.args, self.pref);
        let mut text = String::new();
        let _ = writeln!(
            text,
            "# sim: {} ({}), method {}, seed {}\n",
            pref.name,
            pref.description,
            args.method.name(),
            args.seed
        );
        self.held_out(&mut text);
        self.during_the_run(&mut text);
        self.training(&mut text);
        let _ = writeln!(
            text,
            "- thumbs: {}{}; {}; wall time {:.0} s",
            if args.no_thumbs { "off" } else { "on" },
            if args.correct_every_reply {
                ", every reply corrected"
            } else {
                ""
            },
            if args.deterministic {
                "deterministic (waits for the judge and trainer)".to_string()
            } else {
                format!("think time {} s", args.think_secs)
            },
            self.wall_secs
        );
        text
    }

    /// The held-out set: the rule before and after, reply quality, the first visible effect.
    fn held_out(&self, text: &mut String) {
        let (before, after) = (&self.before, &self.after);
        let (b, a) = (proportion(before), proportion(after));
        let _ = writeln!(text, "- held-out before: {}", b.describe());
        let _ = writeln!(text, "- held-out after:  {}", a.describe());
        let loops =
            |e: &[Evaluated]| report::repeated_trigrams(e.iter().map(|e| e.reply.as_str())) * 100.0;
        let _ = writeln!(
            text,
            "- the hinted teacher (held-out questions with the correction as the trainer's hint, base model): {}; repeated word trigrams {:.1} %",
            proportion(&self.teacher).describe(),
            loops(&self.teacher)
        );
        let ratio = if b.k > 0 {
            format!("{:.1}x the base rate", a.rate() / b.rate())
        } else {
            "base rate 0".into()
        };
        let _ = writeln!(
            text,
            "- change: {:+.0} points ({ratio}); not preferred {} -> {}",
            (a.rate() - b.rate()) * 100.0,
            b.n - b.k,
            a.n - a.k
        );
        let _ = writeln!(
            text,
            "- quality: repeated word trigrams within a reply {:.1} % -> {:.1} %",
            loops(before),
            loops(after)
        );
        // The rule met by a reply a person would accept: one that does not loop (a looping list
        // is short in words for its tokens).
        let clean = |e: &[Evaluated]| {
            e.iter()
                .filter(|e| e.satisfied && !preference::loops(&e.reply))
                .count()
        };
        let _ = writeln!(
            text,
            "- preferred and not looping (under 30 % repeated trigrams): {}/{} -> {}/{}",
            clean(before),
            before.len(),
            clean(after),
            after.len()
        );
        if self.args.eval_every > 0 {
            let mut checkpoints = self.checkpoints.clone();
            checkpoints.push((self.args.interactions, a.n - a.k));
            let before_not = b.n - b.k;
            // Visible: at least 3 held-out replies fewer breaking the rule than before (20
            // held-out questions leave about ±3 replies of noise between runs).
            let first = checkpoints.iter().find(|(_, not)| *not + 3 <= before_not);
            let trail: Vec<String> = checkpoints
                .iter()
                .map(|(i, not)| format!("{i}: {not}"))
                .collect();
            let _ = writeln!(
                text,
                "- first visible effect (held-out not preferred at least 3 below {before_not}): {}; not preferred after each check {}",
                first.map_or("none".to_string(), |(i, _)| format!(
                    "after {i} interactions"
                )),
                trail.join(", ")
            );
        }
    }

    /// The interactions: how many replies met the rule, in each half of the run.
    fn during_the_run(&self, text: &mut String) {
        let rows = &self.rows;
        let satisfied = rows.iter().filter(|r| r.satisfied).count();
        let half = rows.len() / 2;
        let first = rows[..half].iter().filter(|r| r.satisfied).count();
        let second = rows[half..].iter().filter(|r| r.satisfied).count();
        let _ = writeln!(
            text,
            "- during the run: {satisfied}/{} replies satisfied it (first half {first}/{half}, second half {second}/{})",
            rows.len(),
            rows.len() - half
        );
    }

    /// Drift, versions, training cost, the judge, prompt memory and the rollback check.
    fn training(&self, text: &mut String) {
        let v = &self.versions;
        let (live, created, refused) = (v.live, v.created, v.refused);
        match &v.live_row {
            Some(row) => {
                let _ = writeln!(
                    text,
                    "- drift: live v{live}, KL from base on the guard's probes {} (limit {}); {created} versions created, {refused} refused by the guard",
                    row["kl_base"]
                        .as_f64()
                        .map_or("-".into(), |k| format!("{k:.4}")),
                    row["guard"]["limits"]["max_kl_base"]
                );
            }
            None => {
                let _ = writeln!(
                    text,
                    "- drift: none (v{live} live, {created} versions created, {refused} refused by the guard)"
                );
            }
        }
        let rates = if v.rates.is_empty() {
            String::new()
        } else {
            format!(
                "; learning rate of each version's step: {}",
                v.rates.join(" ")
            )
        };
        let _ = writeln!(text, "- training: {}{rates}", self.settled);
        if v.train_secs > 0.0 {
            let _ = writeln!(
                text,
                "- trained: {:.0} tokens in {:.0} s of updates ({:.1} trained tokens/s)",
                v.trained_tokens,
                v.train_secs,
                v.trained_tokens / v.train_secs
            );
        }
        if let Some(j) = &self.judge {
            let _ = writeln!(text, "- judge: {}", j.describe());
        }
        if self.args.method == SimMethod::Prompt {
            let cost = |e: &[Evaluated]| {
                e.iter().map(|e| e.prompt_tokens).sum::<u64>() as f64 / e.len().max(1) as f64
            };
            let _ = writeln!(
                text,
                "- prompt memory: {} correction(s), +{:.0} prompt tokens per request",
                self.corrections,
                cost(&self.after) - cost(&self.before)
            );
        }
        if let Some((same, n)) = self.rollback {
            let _ = writeln!(
                text,
                "- rollback to v0 reproduces the before replies: {same}/{n} identical"
            );
        }
    }

    /// eval.jsonl: every held-out reply, one JSON object per line, phase by phase.
    fn eval_lines(&self) -> String {
        let mut eval = String::new();
        let sets = [("before", &self.before), ("teacher", &self.teacher)]
            .into_iter()
            .chain(self.checked.iter().map(|(p, e)| (p.as_str(), e)))
            .chain([("after", &self.after)]);
        for (phase, set) in sets {
            for e in set.iter() {
                let _ = writeln!(
                    eval,
                    "{}",
                    json!({"phase": phase, "prompt": e.prompt, "reply": e.reply, "satisfied": e.satisfied, "prompt_tokens": e.prompt_tokens})
                );
            }
        }
        eval
    }
}
