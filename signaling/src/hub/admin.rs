//! The admin API's view of rooms: what the shared state holds, with this instance's
//! downlink reports for the seats it serves.

use chorus_protocol::client::ParticipantInfo;

use super::*;

/// A room as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomOverview {
    pub room: String,
    pub node: Option<String>,
    pub participants: Vec<AdminParticipant>,
    pub settings: RoomSettings,
}

/// A participant in the admin API's room view: what every client sees, plus how the
/// node serves its downlink (bandwidth estimate, allocation, layer and pause state per
/// video track) when it receives video. Only the instance holding a participant's
/// WebSocket has its downlink report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdminParticipant {
    #[serde(flatten)]
    pub info: ParticipantInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive: Option<ReceiveStats>,
}

impl Hub {
    /// Every room with seats or settings (or `only` that one), for the admin API.
    pub async fn rooms_overview(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<RoomOverview>, StateError> {
        let names = match only {
            Some(r) => vec![r.to_string()],
            None => self.state.rooms().await?,
        };
        let mut out = Vec::with_capacity(names.len());
        for room in names {
            let snap = self.state.room(&room).await?;
            if snap.seats.is_empty() && snap.settings == RoomSettings::default() {
                continue;
            }
            let local = self.lock();
            let participants = snap
                .seats
                .iter()
                .map(|s| AdminParticipant {
                    info: s.seat.info(),
                    receive: local.seats.get(&s.seat.id).and_then(|l| l.receive.clone()),
                })
                .collect();
            out.push(RoomOverview {
                room,
                node: snap.node,
                participants,
                settings: snap.settings,
            });
        }
        Ok(out)
    }

    /// Forgets the chat of rooms that have been empty and quiet since `cutoff_ms`.
    pub async fn purge_idle_chat(&self, cutoff_ms: u64) -> Result<usize, StateError> {
        self.state.purge_idle_chat(cutoff_ms).await
    }
}
