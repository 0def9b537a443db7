//! Redis transport in kombu's layout: priority-band lists, the `unacked` hash and
//! `unacked_index` zset, the restore sweep under `unacked_mutex`; plus taskhost's own
//! `taskhost.scheduled` zset (ETA parking) and `taskhost.dlq` list (dead letters).
//!
//! Pop and unacked record happen in one Lua script, so a crash can lose nothing while
//! messages are flowing. When every queue is empty the consumer blocks in `BRPOP` and
//! records the one message it wakes with in a second round trip — the same small window
//! kombu always has, open only on an idle-to-busy edge.

mod state;

use super::{Broker, BrokerError, DeadLetter, Delivery};
use crate::protocol::{list_for_priority, mark_redelivered, priority_from, Envelope, BAND_SEP, PRIORITY_BANDS};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use super::redis_conn::{manager, Endpoint, RedisConn, RESPONSE_TIMEOUT};
use redis::{AsyncCommands, Script};
use std::collections::HashMap;
use std::time::Duration;

const UNACKED: &str = "unacked";
const UNACKED_INDEX: &str = "unacked_index";
const UNACKED_MUTEX: &str = "unacked_mutex";
/// kombu holds the sweep lock this long at most (`unacked_mutex_expire`).
const UNACKED_MUTEX_MAX_TTL: Duration = Duration::from_secs(300);

/// A held message's `unacked_index` score: now in unix seconds, rounded up to a whole one,
/// so a message goes back up to 1 s after its visibility timeout, never before. Redis keeps
/// an index of up to 128 entries as a listpack, where a fractional score is kept as text and
/// re-parsed with `strtod` at every entry an insert walks past; a whole one is kept as an
/// integer. At `-p 1 -c 16` (up to 64 held) that walk took half of Redis's CPU.
fn held_score() -> i64 {
    crate::protocol::unix_now().ceil() as i64
}

/// How long a sweep's lock outlives a sweeper killed mid-sweep: kombu's 300 s, or the
/// visibility timeout when that is shorter. With kombu's fixed 300 s, one worker killed
/// while sweeping stops every sweep for five minutes, and the messages of anything else
/// killed meanwhile wait that long, whatever the visibility timeout says. A sweep that
/// outlasts its lock is safe among taskhost workers: each restore is one script that
/// moves a message only while it is still in `unacked`.
fn sweep_lock_ttl(visibility: Duration) -> Duration {
    visibility.clamp(Duration::from_secs(1), UNACKED_MUTEX_MAX_TTL)
}
const SCHEDULED: &str = "taskhost.scheduled";
const DEAD_LETTERS: &str = "taskhost.dlq";
/// Parked messages moved per `move_due` call: bounds one script's run time.
const MOVE_DUE_BATCH: usize = 500;

/// Lua: the delivery tag of a kombu envelope, or false. kombu puts properties (and so
/// the tag) last, so the last `"delivery_tag"` key wins; inside a JSON string that
/// text could only appear with its quotes escaped. Plain `string.find` hops by memchr,
/// where a Lua pattern scan cost ~3.5 µs per message (most of the fetch script).
macro_rules! find_tag_lua {
    () => {
        r#"
local function find_tag(m)
  if string.sub(m, 1, 1) ~= '{' then return false end
  local at, from = nil, 1
  while true do
    local _, e = string.find(m, '"delivery_tag"', from, true)
    if not e then break end
    at, from = e, e + 1
  end
  if not at then return false end
  return string.match(m, '^%s*:%s*"([^"]+)"', at + 1) or false
end
"#
    };
}

/// Lua: holding fetched messages in kombu's `unacked` (tag → `[message, "", queue]`) and
/// `unacked_index` (score `now`): `hold` collects one, `record_held` writes them all, in
/// slices, since Lua's unpack() fails past ~8000 values and a script that fails after its
/// RPOP has already taken the messages off the queue. Shared by FETCH and FAIR_FETCH.
macro_rules! hold_lua {
    () => {
        r#"
local index, held = {}, {}
local function hold(tag, m, queue, now)
  index[#index + 1] = now
  index[#index + 1] = tag
  held[#held + 1] = tag
  held[#held + 1] = '[' .. m .. ', "", ' .. queue .. ']'
end
local function record_held()
  for s = 1, #index, 1000 do
    local e = math.min(s + 999, #index)
    redis.call('ZADD', 'unacked_index', unpack(index, s, e))
    redis.call('HSET', 'unacked', unpack(held, s, e))
  end
end
"#
    };
}

/// Pops up to ARGV[1] messages from KEYS in order (one `RPOP key count` per key, so
/// Redis ≥ 6.2), recording them in unacked with one ZADD and one HSET per call.
/// ARGV[2] = now ([`held_score`]), ARGV[3..] = each key's queue as a JSON string.
/// Returns a flat list: key index, tag (false if none), message.
const FETCH: &str = concat!(
    find_tag_lua!(),
    hold_lua!(),
    r#"
local max = tonumber(ARGV[1])
local now = ARGV[2]
local out = {}
local n = 0
for i, key in ipairs(KEYS) do
  local batch = redis.call('RPOP', key, max - n)
  if batch then
    local queue = ARGV[2 + i]
    for _, m in ipairs(batch) do
      local tag = find_tag(m)
      if tag then hold(tag, m, queue, now) end
      out[#out + 1] = i
      out[#out + 1] = tag
      out[#out + 1] = m
    end
    n = n + #batch
    if n >= max then break end
  end
end
record_held()
return out
"#
);

/// Fair fetch across tenants (`Broker::set_fairness`). Sorts up to ARGV[3] messages of
/// each ingress list (KEYS, kombu's lists in band order) into one list per tenant
/// (`taskhost.fair:<list>\x1f<tenant>`), the tenant read from a bound queue (ARGV[5 + n + i])
/// or the `taskhost_tenant` header; then hands out up to ARGV[1] messages, or fewer once
/// what it charged reaches ARGV[4] CPU-seconds (at least one), each time from the tenant
/// of the lowest virtual time, which grows by that tenant's CPU cost per task over its
/// weight (`taskhost.fair.cost`, `taskhost.fair.weight`). A tenant joining takes the lowest
/// virtual time present, so an idle spell earns no burst. A tenant is handed up to a
/// quantum of work at once (ARGV[5] CPU-seconds, one RPOP), and no more than its free
/// concurrency slots (`taskhost.fair.cap`, less the slot leases its running tasks hold).
/// Records what it hands out in unacked as FETCH does, the ingress queue as its home (a
/// restore goes there).
const FAIR_FETCH: &str = concat!(
    find_tag_lua!(),
    hold_lua!(),
    r#"
local max = tonumber(ARGV[1])
local now = ARGV[2]
local sortn = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local quantum = tonumber(ARGV[5])
local n = #KEYS
local A = 5
local SEP = '\31'
-- A tenant the policy names (every one has a weight in the hash); any other name a header
-- carries is filed under 'default' (the worker dead-letters it), so no header can make
-- lists, keys or work here grow with made-up names.
local known = {}
local function tenant_of(t)
  if known[t] == nil then known[t] = redis.call('HEXISTS', 'taskhost.fair.weight', t) == 1 end
  if known[t] then return t end
  return 'default'
end
local function find_tenant(m)
  local _, e = string.find(m, '"taskhost_tenant"', 1, true)
  if not e then return nil end
  return string.match(m, '^%s*:%s*"([^"]+)"', e + 1)
end
local cost, weight, spent, free = {}, {}, {}, {}
local function step(t)
  if not cost[t] then
    cost[t] = tonumber(redis.call('HGET', 'taskhost.fair.cost', t) or '0.001') or 0.001
    if cost[t] <= 0 then cost[t] = 0.000001 end
    weight[t] = tonumber(redis.call('HGET', 'taskhost.fair.weight', t) or '1') or 1
    if weight[t] <= 0 then weight[t] = 1 end
    -- Free concurrency slots: the cap less the slot leases held now.
    local cap = tonumber(redis.call('HGET', 'taskhost.fair.cap', t) or '')
    if cap then
      local held = 0
      for i = 0, cap - 1 do
        held = held + redis.call('EXISTS', 'taskhost.lease.tenant.' .. t .. '.slot.' .. i)
      end
      free[t] = cap - held
    end
  end
  return cost[t] / weight[t]
end
local function vt_of(t)
  return tonumber(redis.call('HGET', 'taskhost.fair.vt', t) or '0') or 0
end
local out = {}
local got = 0
local joining = {}
-- Sort: kombu's lists into per-tenant lists.
for i, key in ipairs(KEYS) do
  local active = 'taskhost.fair.active:' .. key
  local batch = redis.call('RPOP', key, sortn)
  if batch then
    local bound = ARGV[A + n + i]
    local by_tenant, order = {}, {}
    for _, m in ipairs(batch) do
      local t = (bound ~= '' and bound) or tenant_of(find_tenant(m) or 'default')
      if not by_tenant[t] then by_tenant[t] = {}; order[#order + 1] = t end
      local list = by_tenant[t]
      list[#list + 1] = m
    end
    for _, t in ipairs(order) do
      local list = by_tenant[t]
      for s = 1, #list, 500 do
        redis.call('LPUSH', 'taskhost.fair:' .. key .. SEP .. t, unpack(list, s, math.min(s + 499, #list)))
      end
      if not redis.call('ZSCORE', active, t) then joining[t] = true end
      redis.call('ZADD', active, 0, t)
    end
  end
end
-- Who waits where: per tenant, the lists (in KEYS order, so its own priorities hold).
local where, names = {}, {}
for i, key in ipairs(KEYS) do
  for _, t in ipairs(redis.call('ZRANGE', 'taskhost.fair.active:' .. key, 0, -1)) do
    if not where[t] then where[t] = {}; names[#names + 1] = t end
    where[t][#where[t] + 1] = i
  end
end
-- Virtual times live in one hash, so the workers' corrections with the CPU their tasks
-- really used reach every list. A tenant that had been idle starts no lower than the
-- lowest of those waiting with it: an idle spell earns no burst.
local scores, floor = {}, nil
for _, t in ipairs(names) do
  scores[t] = vt_of(t)
  if not joining[t] and (floor == nil or scores[t] < floor) then floor = scores[t] end
end
for _, t in ipairs(names) do
  if joining[t] and floor and scores[t] < floor then
    scores[t] = floor
    redis.call('HSET', 'taskhost.fair.vt', t, floor)
  end
end
-- Hand out: each time from the tenant of lowest virtual time, across every list, a
-- quantum's worth at once (one message of a task costlier than the quantum).
local live = #names
local charged = 0
while got < max and live > 0 and (got == 0 or charged < budget) do
  local best = nil
  for _, t in ipairs(names) do
    if scores[t] and (best == nil or scores[t] < scores[best]) then best = t end
  end
  local d = step(best)
  local c = cost[best]
  local k = math.max(1, math.floor(quantum / c))
  k = math.min(k, max - got, math.max(1, math.ceil((budget - charged) / c)))
  if free[best] then k = math.min(k, free[best]) end
  local ms, from = nil, nil
  if k > 0 then
    while where[best][1] do
      from = where[best][1]
      ms = redis.call('RPOP', 'taskhost.fair:' .. KEYS[from] .. SEP .. best, k)
      if ms then break end
      redis.call('ZREM', 'taskhost.fair.active:' .. KEYS[from], best)
      table.remove(where[best], 1)
    end
  end
  if not ms then
    -- Nothing left here, or no free slot: out of this fetch, its virtual time kept.
    scores[best] = nil
    live = live - 1
  else
    local queue = ARGV[A + from]
    for _, m in ipairs(ms) do
      local tag = find_tag(m)
      if tag then hold(tag, m, queue, now) end
      out[#out + 1] = from
      out[#out + 1] = tag
      out[#out + 1] = m
      out[#out + 1] = tostring(c)
    end
    local taken = #ms
    got = got + taken
    charged = charged + c * taken
    scores[best] = scores[best] + d * taken
    spent[best] = (spent[best] or 0) + d * taken
    if free[best] then free[best] = free[best] - taken end
  end
end
for t, d in pairs(spent) do redis.call('HINCRBYFLOAT', 'taskhost.fair.vt', t, d) end
record_held()
return out
"#
);

/// Fair dispatch turned off: moves every tenant's sorted list of each ingress list in
/// KEYS back to its consuming end, oldest first (each tenant's order kept), so a worker
/// without fairness runs them. Returns how many it moved.
const UNSORT: &str = r#"
local moved = 0
for _, key in ipairs(KEYS) do
  local active = 'taskhost.fair.active:' .. key
  for _, t in ipairs(redis.call('ZRANGE', active, 0, -1)) do
    local sorted = 'taskhost.fair:' .. key .. '\31' .. t
    while true do
      local ms = redis.call('LPOP', sorted, 500)
      if not ms then break end
      redis.call('RPUSH', key, unpack(ms))
      moved = moved + #ms
    end
  end
  redis.call('DEL', active)
end
return moved
"#;

/// Records one message popped by BRPOP. ARGV: message, now, queue as a JSON string.
/// Returns the tag or false.
const RECORD: &str = concat!(
    find_tag_lua!(),
    r#"
local tag = find_tag(ARGV[1])
if tag then
  redis.call('ZADD', 'unacked_index', ARGV[2], tag)
  redis.call('HSET', 'unacked', tag, '[' .. ARGV[1] .. ', "", ' .. ARGV[3] .. ']')
end
return tag
"#
);

/// Puts held messages back to the front of their lists, each only if it is still held.
/// KEYS[i] = message i's list; ARGV: each message's tag and envelope. Returns how many
/// went back.
const RESTORE: &str = r#"
local moved = 0
for i, list in ipairs(KEYS) do
  local tag = ARGV[2 * i - 1]
  if redis.call('HEXISTS', 'unacked', tag) == 1 then
    redis.call('RPUSH', list, ARGV[2 * i])
    redis.call('HDEL', 'unacked', tag)
    redis.call('ZREM', 'unacked_index', tag)
    moved = moved + 1
  end
end
return moved
"#;

/// Held messages a visibility sweep sizes per round trip, and reads and puts back per round
/// trip where [`RESTORE_BATCH_BYTES`] allows. One message a round trip restored ~85 a
/// second on a loaded machine (20,000 held took minutes).
const RESTORE_BATCH: usize = 200;

/// Bytes of held entries a sweep reads and puts back per round trip. At its peak a sweep
/// holds ~10 copies of a batch (the reply, the parsed entries, the redelivered envelopes,
/// the script's arguments), and a message may be 64 MiB: unbounded, 64 held messages of
/// 3.5 MiB took the worker from 62 to 1,289 MiB; within 4 MiB, +35 MiB.
const RESTORE_BATCH_BYTES: usize = 4 << 20;

/// Splits entries of `sizes` into consecutive runs of at most `budget` bytes each; an
/// entry over the budget on its own makes a run of one.
fn runs_within(sizes: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && bytes.saturating_add(size) > budget {
            runs.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(size);
    }
    if start < sizes.len() {
        runs.push(start..sizes.len());
    }
    runs
}

/// Moves due parked messages (member = list SEP envelope) to the front of their list.
/// ARGV: now (ms), batch size.
const MOVE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local cut = string.find(member, '\6\22\6\22', 1, true)
  if cut then
    redis.call('RPUSH', string.sub(member, 1, cut - 1), string.sub(member, cut + 4))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"#;

/// GCRA: one start per ARGV[2] seconds; returns the wait before this caller's start.
const RATE_SLOT: &str = r#"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(now, tat)
redis.call('SET', KEYS[1], tostring(start + interval), 'PX', math.ceil((start + interval - now) * 1000) + 1000)
return tostring(start - now)
"#;

/// KEYS[1] lease; ARGV: holder, ttl ms.
const LEASE: &str = r#"
local h = redis.call('GET', KEYS[1])
if not h then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif h == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// KEYS[1] ticks hash, and KEYS[2] the band list the tick's message goes onto, if it
/// is sent in the same step; ARGV: entry, due ms, message.
const CLAIM_TICK: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) >= tonumber(ARGV[2]) then return 0 end
if KEYS[2] then redis.call('LPUSH', KEYS[2], ARGV[3]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

const BEAT_TICKS: &str = "taskhost.beat.ticks";
const LEASE_PREFIX: &str = "taskhost.lease.";
const REVOKED: &str = "taskhost.revoked";
const RATE_PREFIX: &str = "taskhost.rate.";
/// `taskhost.usage.<hour>`: one hash per hour of metered usage, fields
/// `<tenant>\x1f<task>\x1f<metric>`; kept 40 days.
const USAGE_PREFIX: &str = "taskhost.usage.";
const USAGE_HOURS_KEPT: i64 = 40 * 24;
/// Fair dispatch's per-tenant weights and CPU cost per task (FAIR_FETCH reads them).
const FAIR_WEIGHTS: &str = "taskhost.fair.weight";
const FAIR_COSTS: &str = "taskhost.fair.cost";
const FAIR_VT: &str = "taskhost.fair.vt";
/// Per tenant, its `max_concurrency`: FAIR_FETCH hands out no more than its free slots.
const FAIR_CAPS: &str = "taskhost.fair.cap";
/// The CPU time of one tenant's tasks FAIR_FETCH hands out at once (fewer RPOPs for tiny
/// tasks; one task of a tenant whose tasks cost more). Fairness holds to within it.
const FAIR_QUANTUM: Duration = Duration::from_millis(1);
/// `taskhost.owner.<task id>`: the tenant whose task (and result) the id is.
const OWNER_PREFIX: &str = "taskhost.owner.";

/// KEYS: owner keys; ARGV[1] ttl seconds, ARGV[1 + i] the tenant claiming KEYS[i].
/// Returns per key the other owner, or '' where the claim holds.
const CLAIM_IDS: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if cur and cur ~= ARGV[i + 1] then
    out[i] = cur
  else
    redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
    out[i] = ''
  end
end
return out
"#;

/// Adds usage rows: per key (the row's hour), ARGV holds the field prefix, the nine sums
/// in `Usage::sums` order, and the memory high-water (kept as a maximum).
const ADD_USAGE: &str = r#"
local names = {'held', 'runs', 'succeeded', 'failed', 'retried', 'rejected', 'cpu_seconds', 'wall_seconds', 'memory_byte_seconds'}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 11
  local prefix = ARGV[base + 1]
  for j, name in ipairs(names) do
    local v = ARGV[base + 1 + j]
    if tonumber(v) ~= 0 then redis.call('HINCRBYFLOAT', key, prefix .. name, v) end
  end
  local hw = tonumber(ARGV[base + 11])
  local cur = tonumber(redis.call('HGET', key, prefix .. 'memory_high_water') or '0')
  if hw > cur then redis.call('HSET', key, prefix .. 'memory_high_water', ARGV[base + 11]) end
  redis.call('EXPIRE', key, 3456000)
end
return 0
"#;

const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

pub(super) fn cmd_err(e: redis::RedisError) -> BrokerError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        BrokerError::Connection(e.to_string())
    } else {
        BrokerError::Command(e.to_string())
    }
}

/// A queue name as the JSON string kombu's unacked entries carry.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}


/// Every band of every queue, grouped by band first as kombu's BRPOP does.
fn band_keys(queues: &[String]) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::new();
    let mut owners = Vec::new();
    for band in PRIORITY_BANDS {
        for q in queues {
            keys.push(list_for_priority(q, band));
            owners.push(q.clone());
        }
    }
    (keys, owners)
}

/// Messages ready on one queue: its band lists (KEYS) and, under fair dispatch, the
/// per-tenant lists its messages were sorted into.
const QUEUE_LENGTH: &str = r#"
local n = 0
for _, key in ipairs(KEYS) do
  n = n + redis.call('LLEN', key)
  for _, t in ipairs(redis.call('ZRANGE', 'taskhost.fair.active:' .. key, 0, -1)) do
    n = n + redis.call('LLEN', 'taskhost.fair:' .. key .. '\31' .. t)
  end
end
return n
"#;

/// The list a control reply for `routing_key` is pushed to.
fn reply_list(routing_key: &str) -> String {
    format!("{routing_key}.{}", crate::protocol::REPLY_EXCHANGE)
}

/// kombu's binding of that list to the reply exchange: the binding set, and the member
/// `routing key SEP pattern SEP queue` that `reply` looks for.
fn reply_binding(routing_key: &str) -> (String, String) {
    let set = format!("_kombu.binding.{}", crate::protocol::REPLY_EXCHANGE);
    (set, format!("{routing_key}{BAND_SEP}{BAND_SEP}{}", reply_list(routing_key)))
}

pub struct RedisBroker {
    url: String,
    db: i64,
    conn: RedisConn,
    /// BRPOP blocks its connection, so it gets its own, without a response timeout: a
    /// BRPOP given up on the client side could still pop on the server, and its reply
    /// (the message) would be lost. A dead peer ends it through TCP keepalive instead.
    blocking: tokio::sync::Mutex<RedisConn>,
    fetch: Script,
    record: Script,
    restore: Script,
    move_due: Script,
    unlock: Script,
    rate_slot: Script,
    add_usage: Script,
    claim_id: Script,
    lease: Script,
    claim_tick: Script,
    fair_fetch: Script,
    unsort: Script,
    queue_length: Script,
    /// Set while fair dispatch is on: queue → the tenant it is bound to.
    fairness: std::sync::RwLock<Option<HashMap<String, String>>>,
}

/// The database number in a redis URL (`redis://host:6379/3` → 3; of a sentinel URL, the
/// first address's).
fn db_of(url: &str) -> i64 {
    let without_fragment = url.split(['#', '?', ';']).next().unwrap_or(url);
    let after_scheme = without_fragment.split_once("://").map_or(without_fragment, |(_, r)| r);
    after_scheme.split_once('/').and_then(|(_, path)| path.trim_matches('/').parse().ok()).unwrap_or(0)
}

/// The fetch script pops with `RPOP key count` (Redis 6.2+); an older server is refused
/// at connect with a clear error rather than failing every fetch.
async fn require_rpop_count(conn: &mut RedisConn) -> Result<(), BrokerError> {
    let info: String = match redis::cmd("INFO").arg("server").query_async(conn).await.map_err(cmd_err) {
        Ok(info) => info,
        Err(e @ BrokerError::Connection(_)) => return Err(e),
        Err(_) => return Ok(()), // an ACL user may not be allowed INFO
    };
    let Some(version) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) else {
        return Ok(()); // not Redis itself (a proxy or a fork): let the first fetch tell
    };
    let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (6, 2) {
        return Err(BrokerError::Connection(format!(
            "Redis {} is too old: taskhost needs 6.2 or newer (RPOP with a count)",
            version.trim()
        )));
    }
    Ok(())
}

impl RedisBroker {
    /// Follows a pub/sub pattern: every message from now on, resubscribing with backoff
    /// after the connection drops, until the receiver is dropped.
    async fn subscribe(&self, pattern: String) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let endpoint = Endpoint::for_url(&self.url).map_err(|e| BrokerError::Connection(e.to_string()))?;
        let mut pubsub = endpoint.pubsub().await.map_err(cmd_err)?;
        pubsub.psubscribe(&pattern).await.map_err(cmd_err)?;
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut backoff = Duration::from_millis(100);
            loop {
                {
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        backoff = Duration::from_millis(100);
                        if tx.send(msg.get_payload_bytes().to_vec()).is_err() {
                            return;
                        }
                    }
                }
                loop {
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    // Through Sentinel, the master may have moved meanwhile.
                    match endpoint.pubsub().await {
                        Ok(mut fresh) => {
                            if fresh.psubscribe(&pattern).await.is_ok() {
                                pubsub = fresh;
                                break;
                            }
                        }
                        Err(e) => tracing::warn!("pub/sub reconnect to {pattern} failed: {e}"),
                    }
                }
            }
        });
        Ok(rx)
    }

    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let conn = manager(url, Some(RESPONSE_TIMEOUT)).await.map_err(|e| BrokerError::Connection(e.to_string()))?;
        let blocking = manager(url, None).await.map_err(|e| BrokerError::Connection(e.to_string()))?;
        require_rpop_count(&mut conn.clone()).await?;
        Ok(RedisBroker {
            url: url.to_string(),
            db: db_of(url),
            conn,
            blocking: tokio::sync::Mutex::new(blocking),
            fetch: Script::new(FETCH),
            record: Script::new(RECORD),
            restore: Script::new(RESTORE),
            move_due: Script::new(MOVE_DUE),
            unlock: Script::new(UNLOCK),
            rate_slot: Script::new(RATE_SLOT),
            add_usage: Script::new(ADD_USAGE),
            claim_id: Script::new(CLAIM_IDS),
            lease: Script::new(LEASE),
            claim_tick: Script::new(CLAIM_TICK),
            queue_length: Script::new(QUEUE_LENGTH),
            fair_fetch: Script::new(FAIR_FETCH),
            unsort: Script::new(UNSORT),
            fairness: std::sync::RwLock::new(None),
        })
    }

    fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// One fetch script run; `budget`: the CPU-seconds fair dispatch may charge in all.
    async fn fetch_now(&self, keys: &[String], owners: &[String], max: usize, budget: f64) -> Result<Vec<Delivery>, BrokerError> {
        let bound = self.fairness.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut inv = match &bound {
            None => self.fetch.prepare_invoke(),
            Some(_) => self.fair_fetch.prepare_invoke(),
        };
        for k in keys {
            inv.key(k);
        }
        inv.arg(max).arg(held_score());
        if bound.is_some() {
            // Sorted ahead of what is handed out, so a tenant arriving behind a flood is
            // seen within a few fetches.
            inv.arg(max.saturating_mul(4).max(1000));
            inv.arg(if budget.is_finite() { budget.max(0.0) } else { 1e18 }).arg(FAIR_QUANTUM.as_secs_f64());
        }
        for o in owners {
            inv.arg(json_string(o));
        }
        if let Some(bound) = &bound {
            for o in owners {
                inv.arg(bound.get(o).map_or("", String::as_str));
            }
        }
        let flat: Vec<redis::Value> = inv.invoke_async(&mut self.conn()).await.map_err(cmd_err)?;
        let bad = |what: &str| BrokerError::Command(format!("unexpected fetch reply: {what}"));
        let fair = bound.is_some();
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut flat = flat.into_iter();
        // Taken by value: each message is moved out of the reply, not copied.
        while let (Some(index), Some(tag), Some(raw)) = (flat.next(), flat.next(), flat.next()) {
            // The fair script adds what it charged the tenant.
            let charge = if fair {
                match flat.next() {
                    Some(redis::Value::BulkString(b)) => std::str::from_utf8(&b).ok().and_then(|c| c.parse::<f64>().ok()),
                    _ => return Err(bad("fair dispatch reply without its charge")),
                }
            } else {
                None
            };
            let queue = match index {
                redis::Value::Int(i) if i >= 1 && (i as usize) <= owners.len() => owners[i as usize - 1].clone(),
                other => return Err(bad(&format!("queue index {other:?}"))),
            };
            let tag = match tag {
                redis::Value::Nil | redis::Value::Int(0) | redis::Value::Boolean(false) => None,
                redis::Value::BulkString(b) => Some(String::from_utf8(b).map_err(|_| bad("delivery tag is not UTF-8"))?),
                other => return Err(bad(&format!("delivery tag {other:?}"))),
            };
            let raw = match raw {
                redis::Value::BulkString(b) => b,
                other => return Err(bad(&format!("message {other:?}"))),
            };
            out.push(Delivery { tag, queue, raw, charge });
        }
        Ok(out)
    }

    /// The list a message held as `[envelope, exchange, routing_key]` goes back to;
    /// `bindings`: the binding tables of named exchanges read so far in this sweep.
    async fn restore_target(&self, entry: &str, bindings: &mut HashMap<String, Vec<String>>) -> Option<(String, Vec<u8>)> {
        let (envelope, exchange, routing_key): (serde_json::Value, String, String) = serde_json::from_str(entry).ok()?;
        let raw = serde_json::to_vec(&envelope).ok()?;
        let queue = if exchange.is_empty() {
            routing_key
        } else {
            // A named exchange routes through kombu's binding table.
            if !bindings.contains_key(&exchange) {
                let members: Vec<String> =
                    self.conn().smembers(format!("_kombu.binding.{exchange}")).await.unwrap_or_default();
                bindings.insert(exchange.clone(), members);
            }
            bindings[&exchange]
                .iter()
                .filter_map(|m| {
                    let mut parts = m.split(BAND_SEP);
                    let (rk, _pattern, queue) = (parts.next()?, parts.next()?, parts.next()?);
                    (rk == routing_key || rk.is_empty()).then(|| queue.to_string())
                })
                .next()
                .unwrap_or(routing_key)
        };
        let priority = priority_from(envelope.get("properties").and_then(|p| p.get("priority")));
        Some((list_for_priority(&queue, priority), raw))
    }

    /// Puts each `(tag, list, envelope)` still held back to the front of its list, marked
    /// redelivered, in one atomic step; how many went back.
    async fn put_back<'a>(&self, held: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8])>) -> Result<usize, BrokerError> {
        let mut restore = self.restore.prepare_invoke();
        let mut any = false;
        for (tag, list, raw) in held {
            restore.key(list).arg(tag).arg(mark_redelivered(raw).unwrap_or_else(|| raw.to_vec()));
            any = true;
        }
        if !any {
            return Ok(0);
        }
        restore.invoke_async(&mut self.conn()).await.map_err(cmd_err)
    }

    /// Puts back whichever of `tags` are still held, in one read and one write; an index
    /// entry whose message is gone is dropped.
    async fn restore_held(&self, tags: &[String], bindings: &mut HashMap<String, Vec<String>>) -> Result<usize, BrokerError> {
        let mut conn = self.conn();
        let entries: Vec<Option<String>> = redis::cmd("HMGET").arg(UNACKED).arg(tags).query_async(&mut conn).await.map_err(cmd_err)?;
        let mut gone = Vec::new();
        let mut held = Vec::with_capacity(tags.len());
        for (tag, entry) in tags.iter().zip(entries) {
            let Some(entry) = entry else {
                gone.push(tag);
                continue;
            };
            match self.restore_target(&entry, bindings).await {
                Some((list, raw)) => held.push((tag, list, raw)),
                None => tracing::warn!(tag = %tag, "unacked entry is not [envelope, exchange, routing_key]; left alone"),
            }
        }
        if !gone.is_empty() {
            let _: () = conn.zrem(UNACKED_INDEX, gone).await.map_err(cmd_err)?;
        }
        self.put_back(held.iter().map(|(tag, list, raw)| (tag.as_str(), list.as_str(), raw.as_slice()))).await
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        self.fetch_within(queues, max, f64::INFINITY, wait).await
    }

    async fn fetch_within(&self, queues: &[String], max: usize, budget: f64, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        if max == 0 || queues.is_empty() {
            return Ok(Vec::new());
        }
        let (keys, owners) = band_keys(queues);
        let got = self.fetch_now(&keys, &owners, max, budget).await?;
        if !got.is_empty() || wait.is_zero() {
            return Ok(got);
        }
        let popped: Option<(String, Vec<u8>)> = {
            let mut blocking = self.blocking.lock().await;
            blocking.brpop(&keys, wait.as_secs_f64().max(0.01)).await.map_err(cmd_err)?
        };
        let Some((key, raw)) = popped else { return Ok(Vec::new()) };
        let queue = owners[keys.iter().position(|k| *k == key).unwrap_or(0)].clone();
        // Popped but not yet recorded: the message is nowhere but here, so recording is
        // retried until it gets through (an outage, a black hole) rather than given up.
        // Recording is idempotent (the unacked entry is keyed by the message's own
        // delivery tag), so a retry after a reply that was lost records it once.
        let mut backoff = Duration::from_millis(50);
        let tag: Option<String> = loop {
            match self.record.arg(&raw).arg(held_score()).arg(json_string(&queue)).invoke_async(&mut self.conn()).await {
                Ok(tag) => break tag,
                Err(e) => {
                    tracing::warn!("recording a popped message failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };
        let mut out = vec![Delivery { tag, queue, raw, charge: None }];
        if max > 1 {
            // The first message is held already: an error here must not drop it.
            match self.fetch_now(&keys, &owners, max - 1, budget).await {
                Ok(more) => out.extend(more),
                Err(e) => tracing::warn!("fetching more after a wake-up failed: {e}"),
            }
        }
        Ok(out)
    }

    async fn ack(&self, tags: &[String]) -> Result<(), BrokerError> {
        if tags.is_empty() {
            return Ok(());
        }
        redis::pipe()
            .atomic()
            .zrem(UNACKED_INDEX, tags)
            .ignore()
            .hdel(UNACKED, tags)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(cmd_err)
    }

    async fn restore(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let Some(tag) = &delivery.tag else { return Ok(()) };
        let priority = Envelope::parse(&delivery.raw).map_or(0, |e| e.priority());
        self.put_back([(tag.as_str(), list_for_priority(&delivery.queue, priority).as_str(), delivery.raw.as_slice())]).await?;
        Ok(())
    }

    async fn touch(&self, tags: &[String]) -> Result<(), BrokerError> {
        if tags.is_empty() {
            return Ok(());
        }
        let now = held_score();
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(UNACKED_INDEX).arg("XX");
        for t in tags {
            cmd.arg(now).arg(t);
        }
        cmd.query_async::<()>(&mut self.conn()).await.map_err(cmd_err)
    }

    async fn restore_expired(&self, visibility: Duration) -> Result<usize, BrokerError> {
        let token = uuid::Uuid::new_v4().to_string();
        let mut conn = self.conn();
        let locked: Option<String> = redis::cmd("SET")
            .arg(UNACKED_MUTEX)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(sweep_lock_ttl(visibility).as_millis() as u64)
            .query_async(&mut conn)
            .await
            .map_err(cmd_err)?;
        if locked.is_none() {
            return Ok(0);
        }
        let ceiling = crate::protocol::unix_now() - visibility.as_secs_f64();
        let result = async {
            let tags: Vec<String> = conn.zrangebyscore(UNACKED_INDEX, "-inf", ceiling).await.map_err(cmd_err)?;
            let mut bindings = HashMap::new();
            let mut restored = 0;
            for batch in tags.chunks(RESTORE_BATCH) {
                // Sized first (one round trip), so no read takes more than the byte budget.
                let mut sizing = redis::Pipeline::with_capacity(batch.len());
                for tag in batch {
                    sizing.cmd("HSTRLEN").arg(UNACKED).arg(tag);
                }
                let sizes: Vec<usize> = sizing.query_async(&mut conn).await.map_err(cmd_err)?;
                for run in runs_within(&sizes, RESTORE_BATCH_BYTES) {
                    restored += self.restore_held(&batch[run], &mut bindings).await?;
                }
            }
            Ok::<_, BrokerError>(restored)
        }
        .await;
        let _: Result<i64, _> = self.unlock.key(UNACKED_MUTEX).arg(&token).invoke_async(&mut conn).await;
        result
    }

    async fn claim_tick_and_publish(
        &self,
        entry: &str,
        due: DateTime<Utc>,
        queue: &str,
        priority: u8,
        raw: &[u8],
    ) -> Result<bool, BrokerError> {
        let claimed: i64 = self
            .claim_tick
            .key(BEAT_TICKS)
            .key(list_for_priority(queue, priority))
            .arg(entry)
            .arg(due.timestamp_millis())
            .arg(raw)
            .invoke_async(&mut self.conn())
            .await
            .map_err(cmd_err)?;
        Ok(claimed == 1)
    }

    async fn publish(&self, queue: &str, priority: u8, raw: &[u8]) -> Result<(), BrokerError> {
        self.conn().lpush::<_, _, ()>(list_for_priority(queue, priority), raw).await.map_err(cmd_err)
    }

    async fn publish_many(&self, queue: &str, priority: u8, raws: &[Vec<u8>]) -> Result<(), BrokerError> {
        if raws.is_empty() {
            return Ok(());
        }
        self.conn().lpush::<_, _, ()>(list_for_priority(queue, priority), raws).await.map_err(cmd_err)
    }

    async fn schedule(&self, queue: &str, priority: u8, raw: &[u8], due: DateTime<Utc>) -> Result<(), BrokerError> {
        let mut member = list_for_priority(queue, priority).into_bytes();
        member.extend_from_slice(BAND_SEP.as_bytes());
        member.extend_from_slice(BAND_SEP.as_bytes());
        member.extend_from_slice(raw);
        self.conn().zadd::<_, _, _, ()>(SCHEDULED, member, due.timestamp_millis()).await.map_err(cmd_err)
    }

    async fn move_due(&self) -> Result<usize, BrokerError> {
        self.move_due
            .key(SCHEDULED)
            .arg(Utc::now().timestamp_millis())
            .arg(MOVE_DUE_BATCH)
            .invoke_async(&mut self.conn())
            .await
            .map_err(cmd_err)
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        let json = serde_json::to_string(letter).expect("dead letter serializes");
        self.conn().rpush::<_, _, ()>(DEAD_LETTERS, json).await.map_err(cmd_err)
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError> {
        let items: Vec<String> = self.conn().lrange(DEAD_LETTERS, 0, -1).await.map_err(cmd_err)?;
        Ok(items.iter().filter_map(|s| serde_json::from_str(s).ok()).collect())
    }

    async fn remove_dead_letter(&self, letter_id: &str) -> Result<bool, BrokerError> {
        let items: Vec<String> = self.conn().lrange(DEAD_LETTERS, 0, -1).await.map_err(cmd_err)?;
        let Some(raw) = items
            .into_iter()
            .find(|s| serde_json::from_str::<DeadLetter>(s).is_ok_and(|l| l.letter_id == letter_id))
        else {
            return Ok(false);
        };
        let removed: i64 = self.conn().lrem(DEAD_LETTERS, 1, raw).await.map_err(cmd_err)?;
        Ok(removed == 1)
    }

    async fn newest_dead_letters(&self, limit: usize) -> Result<(Vec<DeadLetter>, usize), BrokerError> {
        let mut conn = self.conn();
        let total: usize = conn.llen(DEAD_LETTERS).await.map_err(cmd_err)?;
        if limit == 0 {
            return Ok((Vec::new(), total));
        }
        let items: Vec<String> = conn.lrange(DEAD_LETTERS, -(limit as isize), -1).await.map_err(cmd_err)?;
        Ok((items.iter().filter_map(|s| serde_json::from_str(s).ok()).collect(), total))
    }

    async fn broadcast(&self, raw: &[u8]) -> Result<(), BrokerError> {
        // Pub/sub ignores the db number, hence kombu's "/<db>." prefix.
        let channel = format!("/{}.{}", self.db, crate::protocol::PIDBOX_EXCHANGE);
        self.conn().publish::<_, _, ()>(channel, raw).await.map_err(cmd_err)
    }

    async fn control_stream(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        self.subscribe(format!("/{}.{}", self.db, crate::protocol::PIDBOX_EXCHANGE)).await
    }

    async fn publish_event(&self, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError> {
        let channel = format!("/{}.{}/{routing_key}", self.db, crate::protocol::events::EVENT_EXCHANGE);
        self.conn().publish::<_, _, ()>(channel, raw).await.map_err(cmd_err)
    }

    async fn event_stream(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        self.subscribe(format!("/{}.{}/*", self.db, crate::protocol::events::EVENT_EXCHANGE)).await
    }

    async fn declare_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError> {
        let (set, member) = reply_binding(routing_key);
        self.conn().sadd::<_, _, ()>(set, member).await.map_err(cmd_err)
    }

    async fn take_replies(&self, routing_key: &str, wait: Duration) -> Result<Vec<Vec<u8>>, BrokerError> {
        let list = reply_list(routing_key);
        let mut conn = self.conn();
        let mut out: Vec<Vec<u8>> = Vec::new();
        loop {
            let popped: Option<Vec<u8>> = conn.rpop(&list, None).await.map_err(cmd_err)?;
            match popped {
                Some(raw) => out.push(raw),
                None => break,
            }
        }
        if out.is_empty() && !wait.is_zero() {
            let mut blocking = self.blocking.lock().await;
            let got: Option<(String, Vec<u8>)> = blocking.brpop(&list, wait.as_secs_f64()).await.map_err(cmd_err)?;
            out.extend(got.map(|(_, raw)| raw));
        }
        Ok(out)
    }

    async fn remove_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError> {
        let (set, member) = reply_binding(routing_key);
        let mut conn = self.conn();
        conn.srem::<_, _, ()>(set, member).await.map_err(cmd_err)?;
        conn.del::<_, ()>(reply_list(routing_key)).await.map_err(cmd_err)
    }

    async fn queue_lengths(&self, queues: &[String]) -> Result<Vec<u64>, BrokerError> {
        let mut conn = self.conn();
        let mut out = Vec::with_capacity(queues.len());
        for q in queues {
            let mut call = self.queue_length.prepare_invoke();
            for band in PRIORITY_BANDS {
                call.key(list_for_priority(q, band));
            }
            let n: u64 = call.invoke_async(&mut conn).await.map_err(cmd_err)?;
            out.push(n);
        }
        Ok(out)
    }

    async fn reply(&self, exchange: &str, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError> {
        // kombu binds reply queues in the exchange's binding set: routing_key SEP pattern SEP queue.
        let members: Vec<String> = self.conn().smembers(format!("_kombu.binding.{exchange}")).await.map_err(cmd_err)?;
        let queues: Vec<String> = members
            .iter()
            .filter_map(|m| {
                let mut parts = m.split(BAND_SEP);
                let (rk, _pattern, queue) = (parts.next()?, parts.next()?, parts.next()?);
                (rk == routing_key).then(|| queue.to_string())
            })
            .collect();
        for q in queues {
            self.conn().lpush::<_, _, ()>(q, raw).await.map_err(cmd_err)?;
        }
        Ok(())
    }

    async fn remember_revoked(&self, ids: &[String], until: DateTime<Utc>) -> Result<(), BrokerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let score = until.timestamp_millis();
        let items: Vec<(i64, &String)> = ids.iter().map(|id| (score, id)).collect();
        self.conn().zadd_multiple::<_, _, _, ()>(REVOKED, &items).await.map_err(cmd_err)
    }

    async fn revoked(&self) -> Result<Vec<String>, BrokerError> {
        let now = Utc::now().timestamp_millis();
        let mut conn = self.conn();
        let _: () = conn.zrembyscore(REVOKED, "-inf", now).await.map_err(cmd_err)?;
        conn.zrange(REVOKED, 0, -1).await.map_err(cmd_err)
    }

    async fn reserve_rate_slot(&self, key: &str, interval: Duration) -> Result<Duration, BrokerError> {
        let wait: String = self
            .rate_slot
            .key(format!("{RATE_PREFIX}{key}"))
            .arg(crate::protocol::unix_now())
            .arg(interval.as_secs_f64())
            .invoke_async(&mut self.conn())
            .await
            .map_err(cmd_err)?;
        Ok(Duration::try_from_secs_f64(wait.parse::<f64>().unwrap_or(0.0).max(0.0)).unwrap_or(Duration::MAX))
    }

    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let got: i64 = self
            .lease
            .key(format!("{LEASE_PREFIX}{name}"))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(cmd_err)?;
        Ok(got == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        self.unlock
            .key(format!("{LEASE_PREFIX}{name}"))
            .arg(holder)
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map(|_| ())
            .map_err(cmd_err)
    }

    async fn claim_tick(&self, entry: &str, due: DateTime<Utc>) -> Result<bool, BrokerError> {
        let got: i64 = self
            .claim_tick
            .key(BEAT_TICKS)
            .arg(entry)
            .arg(due.timestamp_millis())
            .invoke_async(&mut self.conn())
            .await
            .map_err(cmd_err)?;
        Ok(got == 1)
    }

    async fn last_tick(&self, entry: &str) -> Result<Option<DateTime<Utc>>, BrokerError> {
        let ms: Option<i64> = self.conn().hget(BEAT_TICKS, entry).await.map_err(cmd_err)?;
        Ok(ms.and_then(DateTime::from_timestamp_millis))
    }

    async fn set_fairness(&self, fairness: Option<&super::Fairness>, queues: &[String]) -> Result<(), BrokerError> {
        if let Some(f) = fairness {
            if !f.weights.is_empty() {
                // Replaced whole: a tenant dropped from the policy is no longer known to
                // FAIR_FETCH (its messages go under 'default', and are refused).
                let mut pipe = redis::pipe();
                pipe.atomic().del(FAIR_WEIGHTS).ignore().del(FAIR_CAPS).ignore();
                for (tenant, weight) in &f.weights {
                    pipe.hset(FAIR_WEIGHTS, tenant, *weight).ignore();
                }
                for (tenant, cap) in &f.caps {
                    pipe.hset(FAIR_CAPS, tenant, *cap).ignore();
                }
                pipe.query_async::<()>(&mut self.conn()).await.map_err(cmd_err)?;
            }
        } else {
            // Messages sorted out of these queues while it was on go back where any consumer
            // finds them (a worker with fairness on sorts them again on its next fetch).
            let (keys, _) = band_keys(queues);
            let mut unsort = self.unsort.prepare_invoke();
            for key in &keys {
                unsort.key(key);
            }
            let moved: i64 = unsort.invoke_async(&mut self.conn()).await.map_err(cmd_err)?;
            if moved > 0 {
                tracing::info!(moved, "fair dispatch is off: messages sorted by tenant returned to their queues");
            }
        }
        *self.fairness.write().unwrap_or_else(|p| p.into_inner()) = fairness.map(|f| f.bound.clone());
        Ok(())
    }

    async fn report_costs(&self, costs: &[(String, f64)], corrections: &[(String, f64)]) -> Result<(), BrokerError> {
        if costs.is_empty() && corrections.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (tenant, cost) in costs {
            pipe.hset(FAIR_COSTS, tenant, *cost).ignore();
        }
        for (tenant, delta) in corrections {
            pipe.cmd("HINCRBYFLOAT").arg(FAIR_VT).arg(tenant).arg(*delta).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await.map_err(cmd_err)
    }

    async fn claim_task_ids(&self, claims: &[(String, String)], ttl: Duration) -> Result<Vec<Option<String>>, BrokerError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.claim_id.prepare_invoke();
        call.arg(ttl.as_secs().max(1));
        for (id, tenant) in claims {
            call.key(format!("{OWNER_PREFIX}{id}")).arg(tenant);
        }
        let owners: Vec<String> = call.invoke_async(&mut self.conn()).await.map_err(cmd_err)?;
        Ok(owners.into_iter().map(|o| (!o.is_empty()).then_some(o)).collect())
    }

    async fn add_usage(&self, rows: &[crate::tenant::meter::UsageRow]) -> Result<(), BrokerError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut script = self.add_usage.prepare_invoke();
        for row in rows {
            script.key(format!("{USAGE_PREFIX}{}", row.hour));
            script.arg(format!("{}\x1f{}\x1f", row.tenant, row.task));
            for (_, value) in row.counts.sums() {
                script.arg(value);
            }
            script.arg(row.counts.memory_high_water);
        }
        script.invoke_async::<()>(&mut self.conn()).await.map_err(cmd_err)
    }

    async fn queued(&self, queues: &[String]) -> Result<Vec<Vec<u8>>, BrokerError> {
        let mut conn = self.conn();
        let (keys, _) = band_keys(queues);
        let mut lists = keys.clone();
        for key in &keys {
            let mut found: Vec<String> = Vec::new();
            {
                let mut iter: redis::AsyncIter<String> =
                    conn.scan_match(format!("taskhost.fair:{key}\x1f*")).await.map_err(cmd_err)?;
                while let Some(item) = futures::StreamExt::next(&mut iter).await {
                    found.push(item.map_err(cmd_err)?);
                }
            }
            lists.extend(found);
        }
        let mut out = Vec::new();
        for list in &lists {
            let items: Vec<Vec<u8>> = conn.lrange(list, 0, -1).await.map_err(cmd_err)?;
            out.extend(items);
        }
        // Unacked entries are kombu's [message, exchange, routing key].
        let held: Vec<String> = conn.hvals(UNACKED).await.map_err(cmd_err)?;
        for entry in held {
            if let Ok(serde_json::Value::Array(parts)) = serde_json::from_str(&entry) {
                if let (Some(serde_json::Value::String(message)), Some(serde_json::Value::String(queue))) = (parts.first(), parts.get(2)) {
                    if queues.iter().any(|q| q == queue) {
                        out.push(message.clone().into_bytes());
                    }
                }
            }
        }
        // Parked: `<band list><SEP><SEP><message>`.
        let parked: Vec<Vec<u8>> = conn.zrange(SCHEDULED, 0, -1).await.map_err(cmd_err)?;
        let sep = format!("{BAND_SEP}{BAND_SEP}");
        for member in parked {
            if let Some(at) = member.windows(sep.len()).position(|w| w == sep.as_bytes()) {
                if keys.iter().any(|k| k.as_bytes() == &member[..at]) {
                    out.push(member[at + sep.len()..].to_vec());
                }
            }
        }
        Ok(out)
    }

    async fn usage(&self, since_hour: i64) -> Result<Vec<crate::tenant::meter::UsageRow>, BrokerError> {
        let now_hour = chrono::Utc::now().timestamp().div_euclid(3600);
        let mut cells = Vec::new();
        let mut conn = self.conn();
        for hour in since_hour.max(now_hour - USAGE_HOURS_KEPT)..=now_hour {
            let fields: HashMap<String, f64> = conn.hgetall(format!("{USAGE_PREFIX}{hour}")).await.map_err(cmd_err)?;
            for (field, value) in fields {
                let mut parts = field.splitn(3, '\x1f');
                if let (Some(tenant), Some(task), Some(metric)) = (parts.next(), parts.next(), parts.next()) {
                    cells.push((hour, tenant.to_string(), task.to_string(), metric.to_string(), value));
                }
            }
        }
        Ok(crate::tenant::meter::rows_from_cells(cells))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn db_numbers_come_from_the_url_path() {
        assert_eq!(super::db_of("redis://127.0.0.1:6379/3"), 3);
        assert_eq!(super::db_of("redis://user:pw@host:6379"), 0);
        assert_eq!(super::db_of("rediss://host:6380/12#insecure"), 12);
        assert_eq!(
            super::db_of("sentinel://:pw@h1:26379/4;sentinel://h2:26379/9?master_name=m"),
            4
        );
        assert_eq!(super::db_of("sentinel://h1;sentinel://h2"), 0);
    }

    #[test]
    fn a_sweep_reads_held_messages_in_runs_within_its_byte_budget() {
        use super::runs_within;
        assert!(runs_within(&[], 10).is_empty());
        assert_eq!(runs_within(&[3, 3, 3, 3], 10), vec![0..3, 3..4]);
        assert_eq!(runs_within(&[10, 1], 10), vec![0..1, 1..2], "a full run ends at the budget");
        assert_eq!(runs_within(&[1, 25, 2, 2], 10), vec![0..1, 1..2, 2..4], "an entry over budget goes alone");
        assert_eq!(runs_within(&[0, 0, 0], 10), vec![0..3], "gone entries (size 0) ride along");
        let sizes: Vec<usize> = (0..200).map(|i| (i * 7919) % 5000).collect();
        let runs = runs_within(&sizes, 4096);
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), 200, "every entry in one run");
        assert!(runs.windows(2).all(|w| w[0].end == w[1].start), "runs keep the order");
        assert!(runs.iter().all(|r| r.len() == 1 || sizes[r.clone()].iter().sum::<usize>() <= 4096));
    }

    #[test]
    fn a_sweep_lock_lasts_the_visibility_timeout_within_kombus_300_s() {
        use std::time::Duration;
        assert_eq!(super::sweep_lock_ttl(Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(super::sweep_lock_ttl(Duration::from_secs(3600)), Duration::from_secs(300));
        assert_eq!(super::sweep_lock_ttl(Duration::ZERO), Duration::from_secs(1));
    }
}
