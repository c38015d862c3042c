/* A process that changes its own environment before it crashes, as one that wants to pass for another
 * Azure Batch task would (tests/e2e/test_azure_batch.py):
 *   - every AZ_BATCH_* value is overwritten in place ("forged" padded with 'x'): /proc/<pid>/environ shows it;
 *   - a variable PAD=... is overwritten in place with AZ_BATCH_JOB_ID=injected (padded with '_' variables):
 *     a Batch job appears in /proc/<pid>/environ where there was none;
 *   - setenv() sets AZ_BATCH_POOL_ID and AZ_BATCH_TASK_ID anew (what getenv() in the process sees).
 * Then it writes to read-only memory.
 */
#include <stdlib.h>
#include <string.h>

extern char **environ;

int main(void)
{
    static const char injected[] = "AZ_BATCH_JOB_ID=injected";
    char **copy = environ; /* setenv() below may replace environ: walk the original array */
    for (char **e = copy; *e; e++) {
        char *value = strchr(*e, '=');
        size_t n = value ? strlen(value + 1) : 0;
        if (!strncmp(*e, "AZ_BATCH_", 9) && value) {
            memset(value + 1, 'x', n);
            memcpy(value + 1, "forged", n < 6 ? n : 6);
        } else if (!strncmp(*e, "PAD=", 4) && strlen(*e) > sizeof injected) {
            size_t len = strlen(*e);
            memset(*e, '_', len);
            memcpy(*e, injected, sizeof injected); /* with its NUL: the rest reads as a variable "___..." */
        }
    }
    setenv("AZ_BATCH_POOL_ID", "forged-pool", 1);
    setenv("AZ_BATCH_TASK_ID", "forged-task", 1);
    char *text = "GfG";
    *(volatile char *)(text + 1) = 'n'; /* CRASH HERE */
    return 0;
}
