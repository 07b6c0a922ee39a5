//! The versions: candidates with their guard verdicts, the live one, the history. `a`/`v`
//! decide the selected (else the held) candidate; `R` rolls back to the selected version.

use super::{PaneId, block, theme};
use crate::keymap::Action;
use crate::screen::Screen;
use crate::state::VersionView;
use clawrl_core::store::VersionState;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{List, ListItem, ListState, Paragraph, Wrap};

pub(crate) const COMMANDS: &[Action] = &[Action::Up, Action::Down, Action::Top, Action::Bottom];

/// Version ids as listed: newest first, v0 (the base model) last.
fn listed(app: &Screen) -> Vec<i64> {
    app.state
        .versions
        .iter()
        .rev()
        .map(|v| v.id)
        .chain(std::iter::once(0))
        .collect()
}

pub(crate) fn on_action(app: &mut Screen, a: Action) {
    let ids = listed(app);
    let at = app
        .selected_version
        .and_then(|v| ids.iter().position(|i| *i == v));
    let to = match (a, at) {
        (Action::Up, Some(i)) => i.saturating_sub(1),
        (Action::Down, Some(i)) => (i + 1).min(ids.len() - 1),
        (Action::Up | Action::Down | Action::Top, None) | (Action::Top, _) => 0,
        (Action::Bottom, _) => ids.len() - 1,
        _ => return,
    };
    app.selected_version = Some(ids[to]);
}

fn row(v: Option<&VersionView>, id: i64, live: i64) -> ListItem<'static> {
    let dot = if id == live {
        Span::styled("● ", theme::good())
    } else {
        Span::raw("  ")
    };
    let Some(v) = v else {
        let state = if id == live { "live" } else { "base" };
        return ListItem::new(Line::from(vec![
            dot,
            Span::raw(format!("v0  {state:<9} ")),
            Span::styled("the base model", theme::dim()),
        ]));
    };
    let state_style = match v.state {
        VersionState::Candidate => theme::accent(),
        VersionState::Live => theme::good(),
        VersionState::Vetoed => theme::bad(),
        VersionState::Retired => theme::dim(),
    };
    let guard = if v.guard_passed {
        Span::styled("✓ ", theme::good())
    } else {
        Span::styled("✗ ", theme::bad())
    };
    let kl = v.kl_base.map_or("-".into(), |k| format!("{k:.4}"));
    ListItem::new(Line::from(vec![
        dot,
        Span::raw(format!("v{:<3}", v.id)),
        Span::styled(format!("{:<10}", v.state), state_style),
        guard,
        Span::raw(format!("loss {:.3} KL {kl} n={}", v.loss, v.samples)),
    ]))
}

fn detail(app: &Screen, id: i64) -> Vec<Line<'static>> {
    let Some(v) = app.state.versions.iter().find(|v| v.id == id) else {
        return vec![Line::styled(
            "v0: the base model, always available to roll back to.",
            theme::dim(),
        )];
    };
    let reward = v.mean_reward.map_or("-".into(), |r| format!("{r:+.2}"));
    let kl_live = v.kl_live.map_or("-".into(), |k| format!("{k:.4}"));
    let mut lines = Vec::new();
    if v.reasons.is_empty() {
        lines.push(Line::styled("guard passed", theme::good()));
    } else {
        for r in &v.reasons {
            lines.push(Line::styled(format!("guard: {r}"), theme::bad()));
        }
    }
    if v.state == VersionState::Candidate {
        lines.push(Line::styled("a approves · v vetoes", theme::accent()));
    }
    let rate = v
        .learning_rate
        .map_or(String::new(), |lr| format!(" · lr {lr:.1e}"));
    lines.push(Line::raw(format!(
        "from v{} · {} samples{rate} · mean reward {reward} · KL from parent {kl_live}",
        v.parent, v.samples
    )));
    lines
}

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let focused = app.focus == PaneId::Updates;
    let live = app.state.live_version;
    let ids = listed(app);
    let items: Vec<ListItem> = ids
        .iter()
        .map(|id| row(app.state.versions.iter().find(|v| v.id == *id), *id, live))
        .collect();
    let shown = app
        .selected_version
        .or(app.state.held_candidate())
        .unwrap_or(live);
    let [list_area, detail_area] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(5)]).areas(area);
    let title = format!("{} · live v{live}", PaneId::Updates.title());
    let list = List::new(items)
        .block(block(title, focused))
        .highlight_style(theme::selected())
        .highlight_symbol("▌");
    let selected = app
        .selected_version
        .and_then(|v| ids.iter().position(|i| *i == v));
    let mut state = ListState::default().with_selected(selected);
    frame.render_stateful_widget(list, list_area, &mut state);
    let detail = Paragraph::new(detail(app, shown))
        .wrap(Wrap { trim: true })
        .style(Style::new())
        .block(block(format!("v{shown}"), false));
    frame.render_widget(detail, detail_area);
}
