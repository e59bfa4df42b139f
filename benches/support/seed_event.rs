//! The seed event as a borrowed serde struct: what the bare loop of `end_to_end` parses
//! each event into, and `hot_path`'s serde_json baseline.

use serde::Deserialize;

#[derive(Deserialize)]
#[allow(dead_code)]
pub struct Meta<'a> {
    pub session_id: &'a str,
    pub page: &'a str,
    pub item_id: &'a str,
    pub user_agent: &'a str,
}

#[derive(Deserialize)]
#[allow(dead_code)]
pub struct Event<'a> {
    pub event_type: &'a str,
    pub user_id: &'a str,
    pub action: &'a str,
    pub timestamp: &'a str,
    #[serde(borrow)]
    pub metadata: Option<Meta<'a>>,
}
