// postgrest-js (the client supabase-js uses) against the live stack: upsert by natural key,
// Prefer: tx=rollback dry runs, and the refusal of collection writes without a filter.
// Prints one JSON object of observations; tests/test_postgrest_js.py asserts on it.
import { PostgrestClient } from '@supabase/postgrest-js'

const db = new PostgrestClient(process.env.TP_URL, { headers: { Authorization: `Bearer ${process.env.TP_TOKEN}` } })
const name = process.env.TP_NAME
const out = {}
const pick = (r) => ({ status: r.status, error: r.error ? { code: r.error.code, message: r.error.message } : null,
                       data: r.data })

out.insert = pick(await db.from('suites').insert({ name }).select())
out.upsert = pick(await db.from('suites').upsert({ name, description: 'upserted' }, { onConflict: 'created_by,slug' }).select())
out.upsertNoConflictKey = pick(await db.from('suites').upsert({ name: `${name} two` }).select())
const suiteId = out.insert.data?.[0]?.id
out.actionUpsert1 = pick(await db.from('actions').upsert({ suite_id: suiteId, name: 'search', description: 'one' }, { onConflict: 'suite_id,name' }).select())
out.actionUpsert2 = pick(await db.from('actions').upsert({ suite_id: suiteId, name: 'search', description: 'two' }, { onConflict: 'suite_id,name' }).select())
out.dryRun = pick(await db.from('actions').insert({ suite_id: suiteId, name: 'dry' }).select().rollback())
out.afterDryRun = pick(await db.from('actions').select('id').eq('suite_id', suiteId).eq('name', 'dry'))
out.deleteAll = pick(await db.from('suites').delete())
out.updateAll = pick(await db.from('suites').update({ description: 'all' }))
out.afterAll = pick(await db.from('suites').select('id,description').eq('id', suiteId))
out.deleteOne = pick(await db.from('suites').delete().eq('id', suiteId).select())
console.log(JSON.stringify(out))
