// Fair use per caller (tracepipe.conf, "Fair use"): the key each request is counted under.
//
// Runs in the auth_request subrequest /_tp_fair_use/check, which asks the verification
// server (verify, behind the proxy's cache of verified tokens) who a bearer token is. A token whose ES256
// signature verifies against the stack's public keys (the JWKS file ext and PostgREST use,
// $tp_fair_use_jwks), and that has not expired, is counted under its API key ("key:<key_id>",
// the claim ext's POST /auth/token adds) or else its subject ("sub:<sub>"). Anything else (no
// token, a malformed or forged one, an unknown key id) is counted under the client's address
// ("ip:<addr>"): a forged token naming someone's subject never spends that person's budget.
// The count itself is nginx's limit_req, in the sub-subrequest /_tp_fair_use/count?k=<key>.
// The answer to nginx is 204 (go on) or 401 with X-Tp-Fair-Use: limited, which errors.conf's
// /_tp_error/unauthorized turns into the 429 (/_tp_error/rate_limited). A verified token's
// claims also come back signed HS256 with the proxy's key (X-Tp-Pgrst-Token), which
// pgrst_proxy.conf sends PostgREST instead (tracepipe/stack.py, PROXY_JWT_KEY: why).
//
// njs 0.7 (Debian bookworm's libnginx-mod-http-js 0.7.9): WebCrypto (crypto.subtle), async.

const fs = require('fs');

// DER prefix of a P-256 SubjectPublicKeyInfo; the point (04 || x || y) follows.
const SPKI_P256 = Buffer.from('3059301306072a8648ce3d020106082a8648ce3d030107034200', 'hex');
const BEARER = /^Bearer +([A-Za-z0-9_-]{1,2048})\.([A-Za-z0-9_-]{1,8192})\.([A-Za-z0-9_-]{1,256})$/;

// The roles a token may carry (auth.check_request in db/schema/10_auth.sql says the same).
const TOKEN_ROLES = ['tp_user', 'tp_pipeline', 'tp_admin'];

function b64url(text) {
    return Buffer.from(text, 'base64url');
}

// Read on every request: `tracepipe rotate-jwt-key` adds a key without a reload.
function findKey(r, kid) {
    const jwks = JSON.parse(fs.readFileSync(r.variables.tp_fair_use_jwks));
    const keys = jwks.keys || [];
    for (let i = 0; i < keys.length; i++) {
        const k = keys[i];
        if (k.kid === kid && k.kty === 'EC' && k.crv === 'P-256' && typeof k.x === 'string' && typeof k.y === 'string') {
            return k;
        }
    }
    return null;
}

// The token in Authorization if ext signed it (its ES256 signature verifies under a kid of
// the JWKS): {caller, payload, ttl}, caller null when it has expired; else null. Only a token
// ext signed reaches PostgREST re-signed; PostgREST trusts the proxy's key alone, so a token
// under an unknown kid or a foreign key is refused there (PostgREST 12.0.2 would otherwise try
// every key of its JWKS, whatever the kid).
async function verifiedCaller(r) {
    const m = BEARER.exec(r.headersIn.Authorization || '');
    if (!m) {
        return null;
    }
    const header = JSON.parse(b64url(m[1]).toString());
    if (header.alg !== 'ES256' || typeof header.kid !== 'string') {
        return null;
    }
    const jwk = findKey(r, header.kid);
    if (!jwk) {
        return null;
    }
    const spki = Buffer.concat([SPKI_P256, Buffer.from([4]), b64url(jwk.x), b64url(jwk.y)]);
    const key = await crypto.subtle.importKey('spki', spki, {name: 'ECDSA', namedCurve: 'P-256'}, false, ['verify']);
    const signature = b64url(m[3]);
    if (signature.length !== 64) {
        return null;
    }
    const ok = await crypto.subtle.verify({name: 'ECDSA', hash: 'SHA-256'}, key, signature, m[1] + '.' + m[2]);
    if (!ok) {
        return null;
    }
    const claims = JSON.parse(b64url(m[2]).toString());
    if (TOKEN_ROLES.indexOf(claims.role) < 0) {
        // PostgREST 12.0.2 switches to the role claim before its pre-request hook
        // (auth.check_request, which holds the same list) could refuse it: 403 or 400 there.
        return null;
    }
    const ttl = typeof claims.exp === 'number' ? Math.floor(claims.exp - Date.now() / 1000) : 0;
    if (ttl <= 0) {
        // signed by ext, but expired (or without exp): PostgREST gets it re-signed and says
        // why it refuses; counted under the address
        return {caller: null, payload: m[2], ttl: 0};
    }
    let caller = null;
    if (typeof claims.key_id === 'string' && claims.key_id) {
        caller = 'key:' + claims.key_id;
    } else if (typeof claims.sub === 'string' && claims.sub) {
        caller = 'sub:' + claims.sub;
    }
    return {caller: caller, payload: m[2], ttl: ttl};
}

// The same claims (the token's payload, byte for byte) signed HS256 with the proxy's key,
// for PostgREST (tracepipe/stack.py, PROXY_JWT_KEY: why).
const PROXY_HEADER = Buffer.from(JSON.stringify({alg: 'HS256', typ: 'JWT', kid: 'tp-proxy'})).toString('base64url');

function proxyToken(r, payload) {
    const secret = fs.readFileSync(r.variables.tp_fair_use_proxy_key).toString().trim();
    const input = PROXY_HEADER + '.' + payload;
    return input + '.' + require('crypto').createHmac('sha256', secret).update(input).digest('base64url');
}

// The caller a bearer token verifies as, for the verification server behind the proxy's
// cache (tracepipe.conf: /_tp_fair_use/verify): 200 with X-Tp-Caller and X-Tp-Pgrst-Token,
// cached until the token expires (X-Accel-Expires, at most VERIFIED_CACHE_S), so each token is
// verified once, not on every request; or 200 without them, never cached (a token that does
// not verify now may after a key rotation reaches this copy of the JWKS).
const VERIFIED_CACHE_S = 300;

async function verify(r) {
    let verified = null;
    try {
        verified = await verifiedCaller(r);
    } catch (e) {
        verified = null;  // a token that does not even parse: counted under the address
    }
    if (verified) {
        if (verified.caller) {
            r.headersOut['X-Tp-Caller'] = verified.caller;
        }
        r.headersOut['X-Tp-Pgrst-Token'] = proxyToken(r, verified.payload);
        r.headersOut['X-Accel-Expires'] = String(Math.max(0, Math.min(VERIFIED_CACHE_S, verified.ttl)));
    } else {
        r.headersOut['X-Accel-Expires'] = '0';
    }
    r.return(200);
}

async function check(r) {
    let caller = null;
    let pgrstToken = null;
    const m = BEARER.exec(r.headersIn.Authorization || '');
    if (m) {
        // the cache's key: the token's sha256, so no token is written to disk
        const digest = require('crypto').createHash('sha256').update(r.headersIn.Authorization).digest('hex');
        const reply = await r.subrequest('/_tp_fair_use/verify', {args: 'h=' + digest, method: 'GET'});
        if (reply.status === 200) {
            caller = reply.headersOut['X-Tp-Caller'] || null;
            pgrstToken = reply.headersOut['X-Tp-Pgrst-Token'] || null;
        }
    }
    const key = caller || 'ip:' + r.variables.remote_addr;
    const counted = await r.subrequest('/_tp_fair_use/count', {args: 'k=' + encodeURIComponent(key)});
    if (counted.status === 429) {
        r.headersOut['X-Tp-Fair-Use'] = 'limited';
        r.return(401);
        return;
    }
    if (pgrstToken) {
        r.headersOut['X-Tp-Pgrst-Token'] = pgrstToken;
    }
    r.return(204);
}

function pass(r) {
    r.return(204);
}

export default {check, verify, pass};
