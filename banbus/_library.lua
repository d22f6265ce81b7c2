#!lua name=banbus
--[[
banbus function library: the single write path for ban and allowlist changes.

Every client (Python nodes, the banbus CLI, operators with redis-cli) goes
through these functions, so they all get the same validation and the same
atomic "update the record, index the expiry, append the event, trim the log".

Calls (KEYS[1] is the namespace NS, default "banbus"; keywords are
case-insensitive):

  FCALL banbus_ban      1 NS target ttl [reason] [FORCE] [REPLACE] [ORIGIN name] [EID id]
  FCALL banbus_allow    1 NS target ttl [reason] [FORCE] [REPLACE] [ORIGIN name] [EID id]
  FCALL banbus_unban    1 NS target [ORIGIN name] [EID id] [FORCE]
  FCALL banbus_disallow 1 NS target [ORIGIN name] [EID id] [FORCE]
  FCALL_RO banbus_state   1 NS   -> {last_id, seq, epoch, server_ms, version}
  FCALL_RO banbus_check   1 NS target [FORCE]   -> canonical target
  FCALL_RO banbus_version 0      -> version

  ttl is whole seconds, 0 = permanent.  The reason is ALWAYS the third
  positional argument of ban/allow when present, even if it looks like a
  keyword: to pass an option without a reason, give an empty one:
      FCALL banbus_ban 1 banbus 10.0.0.0/7 0 "" FORCE
  FORCE accepts a prefix wider than the configured minimum (never /0).
  REPLACE sets the expiry to exactly the new one (default: the later of the
  active old one and the new one; permanent wins).  Removal (unban/disallow)
  never needs FORCE; it is accepted there and ignored.

  Writes reply {seq, stream_id, target, expires_ms}; an unban of a target that
  is not recorded writes nothing and replies {0, "", target, 0}.

Keys (one hash tag, so the namespace lives in one Cluster slot with KEYS[1]):
  {NS}:log        stream: op target [expires reason] origin eid seq
  {NS}:bans       hash target -> [expires_ms, reason, origin, seq] (JSON; 0 = permanent)
  {NS}:bans:exp   zset target -> expires_ms (non-permanent entries only)
  {NS}:allow, {NS}:allow:exp   the same for the allowlist
  {NS}:seq        event counter     {NS}:epoch   id of this incarnation of the keyspace
  {NS}:config     hash: maxlen, min_prefix_v4, min_prefix_v6, max_ttl (all optional)
  {NS}:eid:<id>   idempotency record of a write made with EID (24 h)

Errors: "BANBUS_INVALID <field> <message>" with field one of target, ttl,
reason, origin, eid, option, usage:, namespace; "BANBUS_UNSAFE <message>" for
/0 and prefixes wider than the minimum; "BANBUS_CONFIG <message>" for a bad
{NS}:config.  Nothing is written when a call is refused.

Portability: Lua 5.1 without the `bit` library (fakeredis/lupa has none), so
all address arithmetic uses whole numbers in doubles (exact below 2^53).
Numbers are turned into strings with %.0f: tostring(1.8e12) is "1.8e+12".
]]

local VERSION = 3

local DEFAULT_MAXLEN = 100000
local DEFAULT_MIN_V4 = 8
local DEFAULT_MIN_V6 = 32
local DEFAULT_MAX_TTL = 315360000
local MAX_TARGET_LENGTH = 64
local MAX_REASON = 512
-- Long enough for the outbox to retry after an ambiguous failure; a retry
-- after that is a duplicate event, which applies idempotently.
local EID_TTL_MS = '3600000'
local PURGE_BATCH = '100'

-- Errors raised while validating carry this marker so the entry points can
-- turn them into error replies (anything else is re-raised untouched).
local function fail(code, msg)
  error({banbus_error = code .. ' ' .. msg}, 0)
end

local function fmt(n)
  return string.format('%.0f', n)
end

-- Python's repr() of a str, close enough for messages (and truncated like
-- banbus._targets._describe).
local function describe(s)
  local q = "'"
  if string.find(s, "'", 1, true) and not string.find(s, '"', 1, true) then
    q = '"'
  end
  local shown = q .. string.gsub(s, '[%z\1-\31\127\\\'"]', function(c)
    if c == '\\' then return '\\\\' end
    if c == q then return '\\' .. c end
    if c == '"' or c == "'" then return c end
    if c == '\t' then return '\\t' end
    if c == '\n' then return '\\n' end
    if c == '\r' then return '\\r' end
    return string.format('\\x%02x', string.byte(c))
  end) .. q
  if #shown > 80 then
    local cut = 77
    -- never split a UTF-8 sequence
    while cut > 1 and (string.byte(shown, cut + 1) or 0) >= 0x80 and string.byte(shown, cut + 1) < 0xC0 do
      cut = cut - 1
    end
    shown = string.sub(shown, 1, cut) .. '...'
  end
  return shown
end

local function split(s, sep)
  local parts, start = {}, 1
  while true do
    local i = string.find(s, sep, start, true)
    if not i then
      parts[#parts + 1] = string.sub(s, start)
      return parts
    end
    parts[#parts + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- ---------------------------------------------------------------------------
-- Targets: a mirror of banbus._targets.parse_target (Python's ipaddress and
-- glibc inet_ntop).  tests/test_library.py checks both agree.
-- ---------------------------------------------------------------------------

-- What Python's str.strip() removes: every character with str.isspace(),
-- here as UTF-8 byte sequences.
local ASCII_SPACE = {[9] = true, [10] = true, [11] = true, [12] = true, [13] = true,
  [28] = true, [29] = true, [30] = true, [31] = true, [32] = true}
local UNICODE_SPACE = {'\194\133', '\194\160', '\225\154\128', '\226\128\168', '\226\128\169',
  '\226\128\175', '\226\129\159', '\227\128\128',
  -- U+2000 .. U+200A
  '\226\128\128', '\226\128\129', '\226\128\130', '\226\128\131', '\226\128\132',
  '\226\128\133', '\226\128\134', '\226\128\135', '\226\128\136', '\226\128\137',
  '\226\128\138'}

local function strip(s)
  local i, j = 1, #s
  local moved = true
  while moved and i <= j do
    moved = false
    if ASCII_SPACE[string.byte(s, i)] then
      i, moved = i + 1, true
    else
      for _, w in ipairs(UNICODE_SPACE) do
        if string.sub(s, i, i + #w - 1) == w then
          i, moved = i + #w, true
          break
        end
      end
    end
  end
  moved = true
  while moved and j >= i do
    moved = false
    if ASCII_SPACE[string.byte(s, j)] then
      j, moved = j - 1, true
    else
      for _, w in ipairs(UNICODE_SPACE) do
        if j - #w + 1 >= i and string.sub(s, j - #w + 1, j) == w then
          j, moved = j - #w, true
          break
        end
      end
    end
  end
  return string.sub(s, i, j)
end

-- IPv4Address._ip_int_from_string: four decimal octets, no leading zeros.
local function parse_v4(s)
  local parts = split(s, '.')
  if #parts ~= 4 then return nil end
  local value = 0
  for k = 1, 4 do
    local p = parts[k]
    if not string.find(p, '^%d%d?%d?$') then return nil end
    if #p > 1 and string.sub(p, 1, 1) == '0' then return nil end
    local n = tonumber(p)
    if n > 255 then return nil end
    value = value * 256 + n
  end
  return value
end

local function parse_hextet(s)
  if not string.find(s, '^%x%x?%x?%x?$') then return nil end
  return tonumber(s, 16)
end

-- IPv6Address._ip_int_from_string, step by step; returns 8 16-bit groups.
local function parse_v6(s)
  local parts = split(s, ':')
  if #parts < 3 then return nil end
  if string.find(parts[#parts], '.', 1, true) then
    local v4 = parse_v4(table.remove(parts))
    if not v4 then return nil end
    parts[#parts + 1] = string.format('%x', math.floor(v4 / 65536))
    parts[#parts + 1] = string.format('%x', v4 % 65536)
  end
  local n = #parts
  if n > 9 then return nil end
  local skip = nil
  for i = 2, n - 1 do
    if parts[i] == '' then
      if skip then return nil end
      skip = i
    end
  end
  local hi, lo, skipped
  if skip then
    hi, lo = skip - 1, n - skip
    if parts[1] == '' then
      hi = hi - 1
      if hi ~= 0 then return nil end
    end
    if parts[n] == '' then
      lo = lo - 1
      if lo ~= 0 then return nil end
    end
    skipped = 8 - (hi + lo)
    if skipped < 1 then return nil end
  else
    if n ~= 8 or parts[1] == '' or parts[n] == '' then return nil end
    hi, lo, skipped = 8, 0, 0
  end
  local groups = {}
  for i = 1, hi do
    local g = parse_hextet(parts[i])
    if not g then return nil end
    groups[#groups + 1] = g
  end
  for _ = 1, skipped do
    groups[#groups + 1] = 0
  end
  for i = n - lo + 1, n do
    local g = parse_hextet(parts[i])
    if not g then return nil end
    groups[#groups + 1] = g
  end
  return groups
end

local function format_v4(value)
  return string.format('%d.%d.%d.%d', math.floor(value / 16777216), math.floor(value / 65536) % 256,
    math.floor(value / 256) % 256, value % 256)
end

-- glibc inet_ntop6: longest run (first on ties) of >= 2 zero groups becomes
-- "::"; ::a.b.c.d and ::ffff:a.b.c.d keep the dotted quad.
local function format_v6(g)
  local best_base, best_len, cur_base, cur_len = -1, 0, -1, 0
  for i = 1, 8 do
    if g[i] == 0 then
      if cur_base == -1 then
        cur_base, cur_len = i, 1
      else
        cur_len = cur_len + 1
      end
    elseif cur_base ~= -1 then
      if best_base == -1 or cur_len > best_len then
        best_base, best_len = cur_base, cur_len
      end
      cur_base = -1
    end
  end
  if cur_base ~= -1 and (best_base == -1 or cur_len > best_len) then
    best_base, best_len = cur_base, cur_len
  end
  if best_base ~= -1 and best_len < 2 then
    best_base = -1
  end
  local out = {}
  for i = 1, 8 do
    if best_base ~= -1 and i >= best_base and i < best_base + best_len then
      if i == best_base then out[#out + 1] = ':' end
    else
      if i ~= 1 then out[#out + 1] = ':' end
      if i == 7 and best_base == 1 and (best_len == 6 or (best_len == 5 and g[6] == 0xffff)) then
        out[#out + 1] = format_v4(g[7] * 65536 + g[8])
        return table.concat(out)
      end
      out[#out + 1] = string.format('%x', g[i])
    end
  end
  if best_base ~= -1 and best_base + best_len == 9 then
    out[#out + 1] = ':'
  end
  return table.concat(out)
end

-- Keep the first plen bits of a number made of `count` groups of `width` bits.
local function mask_groups(groups, plen, width)
  local out = {}
  for i = 1, #groups do
    local start = (i - 1) * width
    local keep = plen - start
    if keep >= width then
      out[i] = groups[i]
    elseif keep <= 0 then
      out[i] = 0
    else
      local unit = 2 ^ (width - keep)
      out[i] = groups[i] - groups[i] % unit
    end
  end
  return out
end

local function format_net(version, groups, plen)
  local text
  if version == 4 then
    text = format_v4(groups[1])
  else
    text = format_v6(groups)
  end
  if plen == (version == 4 and 32 or 128) then
    return text
  end
  return text .. '/' .. plen
end

local ADDRESS_HINT = ' is not an IP address or CIDR network '
  .. '(expected e.g. 203.0.113.7, 198.51.100.0/24 or 2001:db8::/48)'

-- Returns the canonical text of `text`; fails like parse_target would.
local function plain_octet(p)
  return #p <= 3 and (#p == 1 or string.byte(p, 1) ~= 48) and tonumber(p) <= 255
end

local function canonical_target(text, min_v4, min_v6, force)
  -- Fast path, the common case: a plain dotted quad (no space, no prefix,
  -- octets 0-255 without leading zeros) is its own canonical form.  The
  -- general path below gives the same answer, ten times slower.
  local a, b, c, d = string.match(text, '^(%d+)%.(%d+)%.(%d+)%.(%d+)$')
  if a and plain_octet(a) and plain_octet(b) and plain_octet(c) and plain_octet(d) then
    return text
  end
  local raw = strip(text)
  if raw == '' then
    fail('BANBUS_INVALID', 'target is empty; expected an IP address or CIDR network')
  end
  if #raw > MAX_TARGET_LENGTH then
    fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ' is too long to be an IP address')
  end
  if string.find(raw, '%', 1, true) then
    fail('BANBUS_INVALID', 'target ' .. describe(raw)
      .. " has a zone id; ban the address without '%\226\128\166'")
  end
  local address, prefix = raw, nil
  local slash = string.find(raw, '/', 1, true)
  if slash then
    address, prefix = string.sub(raw, 1, slash - 1), string.sub(raw, slash + 1)
  end
  local version, groups, maxlen
  local v4 = parse_v4(address)
  if v4 then
    version, groups, maxlen = 4, {v4}, 32
  else
    groups = parse_v6(address)
    if not groups then
      fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ADDRESS_HINT)
    end
    version, maxlen = 6, 128
  end
  local plen = maxlen
  if prefix then
    if not string.find(prefix, '^%d%d?%d?$') then
      fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ' has an invalid prefix length '
        .. describe(prefix) .. '; expected /0 to /' .. maxlen)
    end
    plen = tonumber(prefix)
    if plen > maxlen then
      fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ' has prefix /' .. plen
        .. ', longer than /' .. maxlen)
    end
  end
  if version == 6 and plen >= 96 and groups[1] == 0 and groups[2] == 0 and groups[3] == 0
      and groups[4] == 0 and groups[5] == 0 and groups[6] == 0xffff then
    -- IPv4-mapped: ::ffff:203.0.113.7 is 203.0.113.7 (dual-stack listeners
    -- report IPv4 peers this way).
    version, groups, plen, maxlen = 4, {groups[7] * 65536 + groups[8]}, plen - 96, 32
  end
  local network
  if version == 4 then
    network = mask_groups(groups, plen, 32)
  else
    network = mask_groups(groups, plen, 16)
  end
  for i = 1, #groups do
    if network[i] ~= groups[i] then
      fail('BANBUS_INVALID', 'target ' .. describe(raw) .. ' has host bits set; did you mean '
        .. format_net(version, network, plen) .. '?')
    end
  end
  local canonical = format_net(version, network, plen)
  if plen == 0 then
    fail('BANBUS_UNSAFE', canonical .. ' would match every IPv' .. version .. ' address; refused')
  end
  local minimum = version == 4 and min_v4 or min_v6
  if plen < minimum and not force then
    fail('BANBUS_UNSAFE', canonical .. ' is wider than the minimum prefix /' .. minimum
      .. '; pass FORCE to override')
  end
  return canonical
end

-- ---------------------------------------------------------------------------
-- Arguments
-- ---------------------------------------------------------------------------

local function namespace(keys, usage)
  if #keys ~= 1 then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  local ns = keys[1]
  if #ns < 1 or #ns > 64 or string.find(ns, '[{}%s%z\1-\31\127]') then
    fail('BANBUS_INVALID', 'namespace ' .. describe(ns)
      .. ' must be 1 to 64 characters without braces, spaces or control characters')
  end
  return ns
end

local function key(ns, suffix)
  return '{' .. ns .. '}:' .. suffix
end

local function config_int(ns, name, value, default, low, high)
  if not value then return default end
  if not string.find(value, '^%d+$') or #value > 15 then
    fail('BANBUS_CONFIG', key(ns, 'config') .. ' ' .. name .. ' ' .. describe(value)
      .. ' is not a whole number')
  end
  local n = tonumber(value)
  if n < low or n > high then
    fail('BANBUS_CONFIG', key(ns, 'config') .. ' ' .. name .. ' ' .. value .. ' is outside '
      .. low .. '..' .. fmt(high))
  end
  return n
end

local function read_config(ns)
  local v = redis.call('HMGET', key(ns, 'config'), 'maxlen', 'min_prefix_v4', 'min_prefix_v6',
    'max_ttl')
  return {
    maxlen = config_int(ns, 'maxlen', v[1], DEFAULT_MAXLEN, 1, 1e15),
    min_v4 = config_int(ns, 'min_prefix_v4', v[2], DEFAULT_MIN_V4, 0, 32),
    min_v6 = config_int(ns, 'min_prefix_v6', v[3], DEFAULT_MIN_V6, 0, 128),
    max_ttl = config_int(ns, 'max_ttl', v[4], DEFAULT_MAX_TTL, 1, 1e12),
  }
end

local function parse_ttl(text, max_ttl)
  if not string.find(text, '^%d+$') then
    fail('BANBUS_INVALID', 'ttl ' .. describe(text)
      .. ' is not a whole number of seconds; expected 0 (permanent) to ' .. fmt(max_ttl))
  end
  local n = tonumber(text)
  if #text > 15 or n > max_ttl then
    fail('BANBUS_INVALID', 'ttl ' .. describe(text) .. ' is above the maximum of '
      .. fmt(max_ttl) .. ' seconds; use 0 for a permanent entry')
  end
  return n
end

local function valid_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end  -- ASCII
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    if c < 0x80 then
      i = i + 1
    else
      local need
      if c >= 0xC2 and c <= 0xDF then
        need = 1
      elseif c >= 0xE0 and c <= 0xEF then
        need = 2
      elseif c >= 0xF0 and c <= 0xF4 then
        need = 3
      else
        return false
      end
      if i + need > n then return false end
      local lo, hi = 0x80, 0xBF
      if c == 0xE0 then
        lo = 0xA0
      elseif c == 0xED then
        hi = 0x9F
      elseif c == 0xF0 then
        lo = 0x90
      elseif c == 0xF4 then
        hi = 0x8F
      end
      local c2 = string.byte(s, i + 1)
      if c2 < lo or c2 > hi then return false end
      for k = 2, need do
        local ck = string.byte(s, i + k)
        if ck < 0x80 or ck > 0xBF then return false end
      end
      i = i + need + 1
    end
  end
  return true
end

local function check_reason(reason)
  if #reason > MAX_REASON then
    fail('BANBUS_INVALID', 'reason is ' .. #reason .. ' bytes long; the limit is ' .. MAX_REASON)
  end
  local bad = string.find(reason, '[%z\1-\31\127]')
  if bad then
    fail('BANBUS_INVALID', string.format('reason contains the control character 0x%02x at byte %d; '
      .. 'use printable text on one line', string.byte(reason, bad), bad))
  end
  if not valid_utf8(reason) then
    fail('BANBUS_INVALID', 'reason is not valid UTF-8')
  end
end

local function check_name(field, value, limit)
  if #value < 1 or #value > limit or string.find(value, '[^%w%.%_%:%@%-]') then
    fail('BANBUS_INVALID', field .. ' ' .. describe(value) .. ' must be 1 to ' .. limit
      .. ' characters of A-Z a-z 0-9 . _ : @ -')
  end
end

-- Options after the positional arguments.  `adding` is true for ban/allow.
local function parse_options(args, first, adding, fname)
  local opts = {force = false, replace = false, origin = 'fcall', eid = nil}
  local seen = {}
  local i = first
  while i <= #args do
    local word = string.upper(args[i])
    if seen[word] then
      fail('BANBUS_INVALID', 'option ' .. word .. ' is given twice')
    end
    seen[word] = true
    if word == 'FORCE' then
      opts.force = true
    elseif word == 'REPLACE' and adding then
      opts.replace = true
    elseif word == 'ORIGIN' or word == 'EID' then
      local value = args[i + 1]
      if value == nil then
        fail('BANBUS_INVALID', 'option ' .. word .. ' needs a value')
      end
      if word == 'ORIGIN' then
        check_name('origin', value, 64)
        opts.origin = value
      else
        check_name('eid', value, 128)
        opts.eid = value
      end
      i = i + 1
    elseif word == 'REPLACE' then
      fail('BANBUS_INVALID', 'option REPLACE does not apply to ' .. fname)
    else
      local expected = adding and 'FORCE, REPLACE, ORIGIN <name> or EID <id>'
        or 'ORIGIN <name>, EID <id> or FORCE'
      local hint = adding and ' (the reason, if any, is the third argument: use "" for none)' or ''
      fail('BANBUS_INVALID', 'option ' .. describe(args[i]) .. ' is unknown to ' .. fname
        .. '; expected ' .. expected .. hint)
    end
    i = i + 1
  end
  return opts
end

-- ---------------------------------------------------------------------------
-- Writes
-- ---------------------------------------------------------------------------

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), t
end

local function json_string(s)
  -- Control characters never get here (reason, origin and target are
  -- validated), so quotes and backslashes are all there is to escape.
  return '"' .. string.gsub(s, '[\\"]', '\\%0') .. '"'
end

local function record_json(expires, reason, origin, seq)
  return '[' .. fmt(expires) .. ',' .. json_string(reason) .. ',' .. json_string(origin) .. ','
    .. fmt(seq) .. ']'
end

local function record_expires(text)
  local e = string.match(text, '^%[%s*(%d+)')
  return e and tonumber(e)
end

local function purge(ns, table_name, now)
  local zkey = key(ns, table_name .. ':exp')
  local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', fmt(now), 'LIMIT', '0', PURGE_BATCH)
  if #expired > 0 then
    redis.call('ZREM', zkey, unpack(expired))
    redis.call('HDEL', key(ns, table_name), unpack(expired))
  end
end

local function ensure_epoch(ns, time)
  local epoch_key = key(ns, 'epoch')
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    epoch = time[1] .. string.format('%06d', tonumber(time[2]))
    redis.call('SET', epoch_key, epoch)
  end
  return epoch
end

local function stored_reply(text)
  local seq, exp, id, target = string.match(text, '^(%d+) (%d+) (%S*) (%S+)$')
  if not seq then return nil end
  return {tonumber(seq), id, target, tonumber(exp)}
end

local function store_reply(ns, eid, reply)
  local text = fmt(reply[1]) .. ' ' .. fmt(reply[4]) .. ' ' .. reply[2] .. ' ' .. reply[3]
  redis.call('SET', key(ns, 'eid:' .. eid), text, 'PX', EID_TTL_MS)
end

local OPS = {
  banbus_ban = {op = 'ban', table_name = 'bans', adding = true},
  banbus_allow = {op = 'allow', table_name = 'allow', adding = true},
  banbus_unban = {op = 'unban', table_name = 'bans', adding = false},
  banbus_disallow = {op = 'disallow', table_name = 'allow', adding = false},
}

local function write(fname, keys, args)
  local spec = OPS[fname]
  local usage
  if spec.adding then
    usage = 'FCALL ' .. fname .. ' 1 <namespace> <target> <ttl> [reason] [FORCE] [REPLACE] '
      .. '[ORIGIN <name>] [EID <id>]'
  else
    usage = 'FCALL ' .. fname .. ' 1 <namespace> <target> [ORIGIN <name>] [EID <id>]'
  end
  local ns = namespace(keys, usage)
  local npos = spec.adding and 2 or 1
  if #args < npos then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  local reason = ''
  if spec.adding and args[3] ~= nil then
    reason = args[3]
  end
  local opts = parse_options(args, spec.adding and 4 or 2, spec.adding, fname)

  -- 1. Validate everything before writing anything.
  local cfg = read_config(ns)
  -- Removing an entry is never unsafe, so it needs no FORCE.
  local target = canonical_target(args[1], cfg.min_v4, cfg.min_v6, opts.force or not spec.adding)
  local ttl = 0
  if spec.adding then
    ttl = parse_ttl(args[2], cfg.max_ttl)
    check_reason(reason)
  end

  -- 2. Server time; 3. purge what has expired (nodes expire locally, so no events).
  local now, time = now_ms()
  purge(ns, 'bans', now)
  purge(ns, 'allow', now)

  -- 4. A retried call with the same EID gets the first reply, and writes nothing.
  if opts.eid then
    local previous = redis.call('GET', key(ns, 'eid:' .. opts.eid))
    if previous then
      local reply = stored_reply(previous)
      if reply then return reply end
    end
  end

  local hkey, zkey = key(ns, spec.table_name), key(ns, spec.table_name .. ':exp')
  local expires = 0
  local old = redis.call('HGET', hkey, target)
  if spec.adding then
    -- 5. ban/allow: the later expiry wins unless REPLACE; permanent (0) wins.
    if ttl > 0 then
      expires = now + ttl * 1000
    end
    local old_exp = old and record_expires(old)
    if old_exp and not opts.replace and (old_exp == 0 or old_exp > now) then
      if old_exp == 0 or expires == 0 then
        expires = 0
      elseif old_exp > expires then
        expires = old_exp
      end
    end
  elseif not old then
    -- 6. Nothing to remove: no event, nothing written.
    return {0, '', target, 0}
  end

  -- 7. The event, then the record.  Redis has no rollback: the hash and zset
  -- were read above (a WRONGTYPE would have failed there), and the event goes
  -- first, so a failure part-way leaves at most a seq gap (which readers
  -- resync on), never a record change without its event.
  local epoch = ensure_epoch(ns, time)
  local seq = redis.call('INCR', key(ns, 'seq'))
  local eid = opts.eid or (epoch .. '-' .. fmt(seq))
  local id
  if spec.adding then
    id = redis.call('XADD', key(ns, 'log'), 'MAXLEN', '~', fmt(cfg.maxlen), '*',
      'op', spec.op, 'target', target, 'expires', fmt(expires), 'reason', reason,
      'origin', opts.origin, 'eid', eid, 'seq', fmt(seq))
    redis.call('HSET', hkey, target, record_json(expires, reason, opts.origin, seq))
    if expires > 0 then
      redis.call('ZADD', zkey, fmt(expires), target)
    else
      redis.call('ZREM', zkey, target)
    end
  else
    id = redis.call('XADD', key(ns, 'log'), 'MAXLEN', '~', fmt(cfg.maxlen), '*',
      'op', spec.op, 'target', target, 'origin', opts.origin, 'eid', eid, 'seq', fmt(seq))
    redis.call('HDEL', hkey, target)
    redis.call('ZREM', zkey, target)
  end

  -- 8. The reply (remembered for retries when the caller gave an EID).
  local reply = {seq, id, target, expires}
  if opts.eid then
    store_reply(ns, opts.eid, reply)
  end
  return reply
end

-- ---------------------------------------------------------------------------
-- Reads
-- ---------------------------------------------------------------------------

local function state(keys, args)
  local ns = namespace(keys, 'FCALL_RO banbus_state 1 <namespace>')
  if #args > 0 then
    fail('BANBUS_INVALID', 'usage: FCALL_RO banbus_state 1 <namespace>')
  end
  -- The newest entry's id and seq are the bootstrap watermark; both come from
  -- one atomic read.
  local last_id, seq = '0-0', nil
  local newest = redis.call('XREVRANGE', key(ns, 'log'), '+', '-', 'COUNT', '1')
  if newest[1] then
    last_id = newest[1][1]
    local fields = newest[1][2]
    for i = 1, #fields, 2 do
      if fields[i] == 'seq' then
        seq = tonumber(fields[i + 1])
      end
    end
  end
  if not seq then
    seq = tonumber(redis.call('GET', key(ns, 'seq')) or '0') or 0
  end
  local epoch = redis.call('GET', key(ns, 'epoch')) or ''
  local now = now_ms()
  return {last_id, seq, epoch, now, VERSION}
end

local function check(keys, args)
  local usage = 'FCALL_RO banbus_check 1 <namespace> <target> [FORCE]'
  local ns = namespace(keys, usage)
  if #args < 1 or #args > 2 then
    fail('BANBUS_INVALID', 'usage: ' .. usage)
  end
  local force = false
  if args[2] ~= nil then
    if string.upper(args[2]) ~= 'FORCE' then
      fail('BANBUS_INVALID', 'option ' .. describe(args[2])
        .. ' is unknown to banbus_check; expected FORCE')
    end
    force = true
  end
  local cfg = read_config(ns)
  return canonical_target(args[1], cfg.min_v4, cfg.min_v6, force)
end

-- Turn validation failures into error replies; anything else (a Redis error
-- from redis.call, a bug) propagates as is.
local function entry(impl)
  return function(keys, args)
    local ok, result = pcall(impl, keys, args)
    if ok then
      return result
    end
    if type(result) == 'table' and result.banbus_error then
      return redis.error_reply(result.banbus_error)
    end
    error(result, 0)
  end
end

-- Only `redis` is reachable while a library loads (Redis 7.0: not even
-- `string` or `pairs`), hence no loop here and no library aliases at the top.
local function register_write(fname)
  redis.register_function{
    function_name = fname,
    callback = entry(function(keys, args) return write(fname, keys, args) end),
  }
end

register_write('banbus_ban')
register_write('banbus_allow')
register_write('banbus_unban')
register_write('banbus_disallow')

redis.register_function{
  function_name = 'banbus_state',
  callback = entry(state),
  flags = {'no-writes'},
}

redis.register_function{
  function_name = 'banbus_check',
  callback = entry(check),
  flags = {'no-writes'},
}

redis.register_function{
  function_name = 'banbus_version',
  callback = function() return VERSION end,
  flags = {'no-writes'},
}
