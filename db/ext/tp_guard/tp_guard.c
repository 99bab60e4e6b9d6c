/*
 * tp_guard: settings an analyst cannot raise (DESIGN.md §4, issue 13).
 *
 * PostgreSQL lets every role SET any PGC_USERSET setting (work_mem, hash_mem_multiplier,
 * default_transaction_read_only, statement_timeout, ...), and GRANT SET ON PARAMETER only
 * widens, it never narrows. Loaded through shared_preload_libraries, this module wraps the
 * check hooks of a few settings so that, for a session whose session user is a member of
 * tp_analyst (never a superuser; an analyst cannot change its session user, and SET ROLE
 * only reaches tp_analyst itself):
 *
 *   - work_mem, hash_mem_multiplier, max_parallel_workers_per_gather may be lowered, never
 *     raised above the session's reset value (what the analyst's login role sets);
 *   - statement_timeout and idle_in_transaction_session_timeout may be lowered, never
 *     raised or turned off (0);
 *   - default_transaction_read_only and transaction_read_only stay on.
 *
 * Check hooks run for every way of setting a value: SET, SET LOCAL, set_config(), a
 * function's SET clause, BEGIN/SET TRANSACTION READ WRITE, SET SESSION CHARACTERISTICS,
 * the connection's startup options (refused outright for these settings) and ALTER ROLE
 * ... SET validation. The role's own settings, applied at login (source user), pass.
 * A ProcessUtility hook closes the paths that bypass check hooks: ALTER ROLE (a role may
 * otherwise change its own login defaults, or log its password in clear text through
 * pgaudit) and RESET transaction_read_only; it
 * also refuses NOTIFY and LISTEN (read-only transactions allow them, and PostgREST reloads
 * on a NOTIFY pgrst). An ExecutorStart hook refuses any query of an analyst's that runs in
 * a read-write transaction (set_config('transaction_read_only', NULL, true) resets without
 * a check hook).
 */
#include "postgres.h"

#include "access/parallel.h"
#include "access/xact.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/guc_tables.h"

PG_MODULE_MAGIC;

#define ANALYST_GROUP "tp_analyst"

void		_PG_init(void);

typedef enum
{
	AT_MOST,					/* may be lowered, not raised */
	POSITIVE_AT_MOST,			/* a limit: lowered, never raised or 0 (off) */
	ALWAYS_ON					/* a boolean that stays true */
} PinRule;

enum
{
	P_WORK_MEM, P_HASH_MEM_MULTIPLIER, P_MAX_PARALLEL_WORKERS_PER_GATHER, P_STATEMENT_TIMEOUT,
	P_IDLE_IN_TRANSACTION_SESSION_TIMEOUT, P_DEFAULT_TRANSACTION_READ_ONLY, P_TRANSACTION_READ_ONLY
};

typedef struct
{
	const char *name;
	PinRule		rule;
	struct config_generic *conf;
	union
	{
		GucIntCheckHook int_hook;
		GucRealCheckHook real_hook;
		GucBoolCheckHook bool_hook;
	}			prev;
} Pinned;

static Pinned pinned[] = {
	{"work_mem", AT_MOST},
	{"hash_mem_multiplier", AT_MOST},
	{"max_parallel_workers_per_gather", AT_MOST},
	{"statement_timeout", POSITIVE_AT_MOST},
	{"idle_in_transaction_session_timeout", POSITIVE_AT_MOST},
	{"default_transaction_read_only", ALWAYS_ON},
	{"transaction_read_only", ALWAYS_ON},
};
#define NPINNED (sizeof(pinned) / sizeof(pinned[0]))

static ProcessUtility_hook_type prev_utility = NULL;
static ExecutorStart_hook_type prev_executor_start = NULL;

/* Whether the running session is an analyst's. Needs catalog access: outside a
 * transaction (server start, config reload) nothing is an analyst's doing. */
static bool
analyst_session(void)
{
	Oid			group;
	Oid			session_user;

	if (!IsUnderPostmaster || IsParallelWorker() || !IsTransactionState())
		return false;
	session_user = GetSessionUserId();
	if (!OidIsValid(session_user))
		return false;
	group = get_role_oid(ANALYST_GROUP, true);
	if (!OidIsValid(group))
		return false;
	return is_member_of_role_nosuper(session_user, group);
}

/* Sources an analyst controls: startup options, ALTER ROLE validation, SET in any form. */
static bool
analyst_source(GucSource source)
{
	return source >= PGC_S_CLIENT && source != PGC_S_OVERRIDE;
}

static bool
refuse(const Pinned *p, GucSource source)
{
	GUC_check_errcode(ERRCODE_INSUFFICIENT_PRIVILEGE);
	if (source == PGC_S_CLIENT)
		GUC_check_errmsg("%s cannot be set in an analyst's connection options", p->name);
	else if (p->rule == ALWAYS_ON)
		GUC_check_errmsg("%s is pinned on for analysts", p->name);
	else if (p->rule == POSITIVE_AT_MOST)
		GUC_check_errmsg("%s is pinned for analysts: it may be lowered, not raised or turned off", p->name);
	else
		GUC_check_errmsg("%s is pinned for analysts: it may be lowered, not raised", p->name);
	GUC_check_errdetail("Analysts' sessions keep their role's limits (tracepipe analyst create).");
	GUC_check_errhint("An operator changes them with the TP_ANALYST_* settings and `tracepipe migrate`.");
	return false;
}

static Pinned *
find_pinned(struct config_generic *conf)
{
	for (size_t i = 0; i < NPINNED; i++)
		if (pinned[i].conf == conf)
			return &pinned[i];
	return NULL;
}

#define DEFINE_INT_HOOK(fn, varname) \
static bool \
fn(int *newval, void **extra, GucSource source) \
{ \
	Pinned	   *p = &pinned[varname]; \
	struct config_int *c = (struct config_int *) p->conf; \
	if (p->prev.int_hook && !p->prev.int_hook(newval, extra, source)) \
		return false; \
	if (!analyst_source(source) || !analyst_session()) \
		return true; \
	if (source == PGC_S_CLIENT) \
		return refuse(p, source); \
	if (p->rule == POSITIVE_AT_MOST) \
	{ \
		if (c->reset_val != 0 && (*newval == 0 || *newval > c->reset_val)) \
			return refuse(p, source); \
	} \
	else if (*newval > c->reset_val) \
		return refuse(p, source); \
	return true; \
}

DEFINE_INT_HOOK(check_work_mem, P_WORK_MEM)
DEFINE_INT_HOOK(check_max_parallel_workers_per_gather, P_MAX_PARALLEL_WORKERS_PER_GATHER)
DEFINE_INT_HOOK(check_statement_timeout, P_STATEMENT_TIMEOUT)
DEFINE_INT_HOOK(check_idle_in_transaction_session_timeout, P_IDLE_IN_TRANSACTION_SESSION_TIMEOUT)

static bool
check_hash_mem_multiplier(double *newval, void **extra, GucSource source)
{
	Pinned	   *p = &pinned[P_HASH_MEM_MULTIPLIER];
	struct config_real *c = (struct config_real *) p->conf;

	if (p->prev.real_hook && !p->prev.real_hook(newval, extra, source))
		return false;
	if (!analyst_source(source) || !analyst_session())
		return true;
	if (source == PGC_S_CLIENT || *newval > c->reset_val)
		return refuse(p, source);
	return true;
}

#define DEFINE_BOOL_HOOK(fn, varname) \
static bool \
fn(bool *newval, void **extra, GucSource source) \
{ \
	Pinned	   *p = &pinned[varname]; \
	if (p->prev.bool_hook && !p->prev.bool_hook(newval, extra, source)) \
		return false; \
	if (!analyst_source(source) || !analyst_session()) \
		return true; \
	if (source == PGC_S_CLIENT || !*newval) \
		return refuse(p, source); \
	return true; \
}

DEFINE_BOOL_HOOK(check_default_transaction_read_only, P_DEFAULT_TRANSACTION_READ_ONLY)
DEFINE_BOOL_HOOK(check_transaction_read_only, P_TRANSACTION_READ_ONLY)

static void
guard_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
			  ProcessUtilityContext context, ParamListInfo params, QueryEnvironment *queryEnv,
			  DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;

	/* Its own role is the one an analyst could alter: login defaults the watchdog reads, and
	 * a password in clear text that pgaudit would log. */
	if ((IsA(stmt, AlterRoleSetStmt) || IsA(stmt, AlterRoleStmt)) && analyst_session())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("analysts cannot alter their login role (ALTER ROLE: settings, password)"),
				 errhint("An operator sets analysts' limits with `tracepipe analyst create` and `tracepipe migrate`,"
						 " and issues a new password with `tracepipe analyst revoke` and `create`.")));
	if ((IsA(stmt, NotifyStmt) || IsA(stmt, ListenStmt)) && analyst_session())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("analysts cannot use NOTIFY or LISTEN"),
				 errdetail("The services listen on channels (PostgREST's pgrst) an analyst must not signal.")));
	if (IsA(stmt, VariableSetStmt))
	{
		VariableSetStmt *set = (VariableSetStmt *) stmt;

		/* RESET takes the reset value without a check hook; transaction_read_only's is off. */
		if (set->kind == VAR_RESET && set->name != NULL && analyst_session())
		{
			struct config_generic **vars = get_guc_variables();
			int			n = GetNumConfigOptions();

			for (int i = 0; i < n; i++)
			{
				Pinned	   *p = find_pinned(vars[i]);

				if (p != NULL && p->rule == ALWAYS_ON && pg_strcasecmp(vars[i]->name, set->name) == 0)
					ereport(ERROR,
							(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
							 errmsg("%s is pinned on for analysts", p->name)));
			}
		}
	}
	if (prev_utility)
		prev_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

/* set_config(name, NULL, ...) is a RESET that no check hook sees: a read-write transaction
 * of an analyst's is refused at its next query. */
static void
guard_executor_start(QueryDesc *queryDesc, int eflags)
{
	if (!XactReadOnly && analyst_session())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("transaction_read_only is pinned on for analysts")));
	if (prev_executor_start)
		prev_executor_start(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
}

void
_PG_init(void)
{
	struct config_generic **vars;
	int			n;

	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errmsg("tp_guard must be loaded through shared_preload_libraries")));

	vars = get_guc_variables();
	n = GetNumConfigOptions();
	for (int i = 0; i < n; i++)
	{
		for (size_t j = 0; j < NPINNED; j++)
		{
			if (strcmp(vars[i]->name, pinned[j].name) == 0)
				pinned[j].conf = vars[i];
		}
	}
	for (size_t j = 0; j < NPINNED; j++)
	{
		struct config_generic *c = pinned[j].conf;

		if (c == NULL)
			elog(FATAL, "tp_guard: no setting named %s", pinned[j].name);
		switch (c->vartype)
		{
			case PGC_INT:
				{
					struct config_int *ci = (struct config_int *) c;

					pinned[j].prev.int_hook = ci->check_hook;
					ci->check_hook = j == P_WORK_MEM ? check_work_mem
						: j == P_MAX_PARALLEL_WORKERS_PER_GATHER ? check_max_parallel_workers_per_gather
						: j == P_STATEMENT_TIMEOUT ? check_statement_timeout
						: check_idle_in_transaction_session_timeout;
					break;
				}
			case PGC_REAL:
				{
					struct config_real *cr = (struct config_real *) c;

					pinned[j].prev.real_hook = cr->check_hook;
					cr->check_hook = check_hash_mem_multiplier;
					break;
				}
			case PGC_BOOL:
				{
					struct config_bool *cb = (struct config_bool *) c;

					pinned[j].prev.bool_hook = cb->check_hook;
					cb->check_hook = j == P_DEFAULT_TRANSACTION_READ_ONLY ? check_default_transaction_read_only
						: check_transaction_read_only;
					break;
				}
			default:
				elog(FATAL, "tp_guard: %s has an unexpected type", pinned[j].name);
		}
	}
	prev_executor_start = ExecutorStart_hook;
	ExecutorStart_hook = guard_executor_start;
	prev_utility = ProcessUtility_hook;
	ProcessUtility_hook = guard_utility;
}
