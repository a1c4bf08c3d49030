//! Token requests (FIG. 4) and the long-poll watch.

use super::*;

// ---- tokens and watch

pub(super) async fn token(
    c: Caller,
    State(reg): State<Shared>,
    body: Bytes,
) -> ApiResult<TokenGrant> {
    let req: TokenRequest = parse(&body)?;
    match reg.token(&c.0, &req) {
        Ok(g) => Ok(Json(g)),
        Err(e) => {
            log::info!("token refused to {}: {}", c.0, e.message);
            Err(e)
        }
    }
}

pub(super) async fn watch(
    _: Caller,
    State(reg): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<WatchResponse> {
    let since: u64 = match q.get("since") {
        None => 0,
        Some(s) => s.parse().map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("since={s:?} is not a generation number"),
            )
        })?,
    };
    let timeout = match q.get("timeout_ms") {
        None => DEFAULT_WATCH,
        Some(s) => Duration::from_millis(s.parse().map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("timeout_ms={s:?} is not a number"),
            )
        })?),
    }
    .min(MAX_WATCH);
    let vms: Vec<String> = q
        .get("vms")
        .map(|s| {
            s.split(',')
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for v in &vms {
        validate_id(v).map_err(|m| ApiError::new(ErrorCode::InvalidId, m))?;
    }
    let mut rx = reg.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        {
            let m = reg.read();
            if since > m.generation {
                // The client knows a future we do not: the store was replaced. Start over.
                return Ok(Json(WatchResponse {
                    generation: m.generation,
                    changes: vec![],
                    resync: true,
                }));
            }
            let (changes, resync) = m.changes_since(since, &vms);
            if !changes.is_empty() || resync {
                let generation = changes
                    .last()
                    .map_or(m.generation, |c| c.generation.max(since));
                let generation = if resync { m.generation } else { generation };
                return Ok(Json(WatchResponse {
                    generation,
                    changes,
                    resync,
                }));
            }
            rx.mark_unchanged();
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => {
                let generation = reg.read().generation;
                return Ok(Json(WatchResponse {
                    generation,
                    changes: vec![],
                    resync: false,
                }));
            }
        }
    }
}
