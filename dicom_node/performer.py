"""The IHE AIW-I task performer (``pacsclip performer``): UPS-RS workitems pulled from a Task
Manager, their inputs analysed as a pushed study is, the results stored where the workitem
says, and the workitem completed with its outputs listed, or cancelled with a reason.

One loop. Each tick moves every open workitem of this performer one step on, then asks the
Task Manager for more when there is room. Every step is written to the claims journal
(``plugin.catalog.ups_workitems``) before the next one starts, and each step can be done
again without harm, so a performer killed anywhere picks its workitems up at restart and
finishes each once:

    claiming -> claimed -> queued -> analysed -> stored -> completed
    claiming -> taken       another performer's claim came first (409)
    any step -> cancelling -> canceled       the workitem cannot be done; the reason goes back
    any step -> gone        the Task Manager finished or cancelled it meanwhile

- claiming: the Transaction UID is journaled before the claim is sent. A 409 on a claim is
  another performer's, unless the Task Manager accepts an update under our Transaction UID
  (our own claim, sent just before a crash).
- claimed: read the workitem, retrieve its inputs by WADO-RS [RAD-107], spool and catalog
  them, complete the study and queue its analysis on the workers (the push path's task).
- queued: wait for the live analysis of that study generation; a failed task or no live
  model cancels the workitem with the reason.
- analysed: store SR, overlays and SEGs by STOW-RS at the Output Destination [RAD-108].
- stored: Performed Procedure Sequence with the outputs, then COMPLETED [RAD-85].

Errors worth a retry (the Task Manager, the WADO-RS source or the STOW-RS destination not
answering, the broker away) are retried with backoff; inputs or outputs that keep failing
cancel the workitem ``ups_give_up_after_s`` after its claim. The Task Manager's reachability
is written to the performer's heartbeat row, which the operations page shows.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Final, Protocol
from urllib.parse import urlsplit

import requests
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, generate_uid
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.workitem_intake import InputRefused, WorkitemIntake
from plugin.aiwi.ups import CANCELED as UPS_CANCELED
from plugin.aiwi.ups import COMPLETED as UPS_COMPLETED
from plugin.aiwi.ups import (
    Claim,
    ClaimTaken,
    UpsClient,
    UpsError,
    inputs_of,
    performed_procedure,
    task_code,
)
from plugin.catalog import repository
from plugin.catalog.analyses import live_results, study_progress
from plugin.catalog.db import Catalog
from plugin.catalog.ups_workitems import (
    ANALYSED,
    CANCELED,
    CANCELLING,
    CLAIMED,
    CLAIMING,
    COMPLETED,
    GONE,
    QUEUED,
    STORED,
    TAKEN,
    JournaledWorkitem,
    heartbeat,
    journal_claim,
    journaled,
    open_workitems,
    set_workitem,
    workitem,
)
from plugin.delivery.destinations import stow_destination
from plugin.delivery.outcome import DispatchError
from plugin.delivery.stow import StowDestination, stow_files
from plugin.dicomweb import WebAuth, WebError, retrieve_instances
from plugin.errors import OutOfResources, PacsclipError
from plugin.settings import DestinationConfig, Settings
from plugin.study_state import StudyState

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S: Final = 2.0
BACKOFF_MAX_S: Final = 60.0
# How often an open workitem waiting on its analysis is looked at.
BUSY_TICK_S: Final = 0.1
HEARTBEAT_EVERY_S: Final = 5.0
# What the worklist calls urgent; the Task Manager's HIGH is pacsclip's STAT.
PRIORITIES: Final = {"HIGH": "stat"}


class Analyses(Protocol):
    """The workers' analysis task, as ``dicom_node.celery_publisher.CeleryPublisher`` sends it."""

    def analyse(self, study_uid: str, generation: int, priority: str) -> str: ...

    def failure(self, task_id: str) -> str | None: ...


class Retry(PacsclipError):
    """A step failed on something that may come back (a service down, the broker away)."""


class Cancel(PacsclipError):
    """The workitem cannot be done; the message is the Reason For Cancellation."""


class Performer:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        ups: UpsClient,
        web: requests.Session,
        intake: WorkitemIntake,
        analyses: Analyses,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.sessions = catalog.sessions
        self.ups = ups
        self.web = web
        self.intake = intake
        self.analyses = analyses
        self.now = now
        self.ae_title = settings.performer_ae_title
        self.codes = list(settings.ups_task_codes)
        self._task_manager_error: str | None = None
        self._last_heartbeat: datetime | None = None
        self._reported_error: str | None = None
        self._polled_at: float | None = None  # monotonic time of the last search

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self.beat(started=True)
        logger.info(
            "task performer %s takes %s from %s",
            self.ae_title,
            ", ".join(self.codes),
            _without_credentials(self.ups.base_url),
        )
        while not stop.is_set():
            try:
                busy = self.tick()
            except Exception:
                # Whatever escaped a round (a bug, a library's surprise): logged, and the next
                # round goes on from the journal; a performer that exits would only restart
                # into the same round.
                logger.exception("task performer round failed; the next one goes on")
                busy = False
            stop.wait(BUSY_TICK_S if busy else self._until_next_poll())

    def tick(self) -> bool:
        """One round: move open workitems on, take new ones; True while some are open."""
        self.ups.forget_contact()
        try:
            with self.sessions() as session:
                items = open_workitems(session, self.ae_title)
            for item in items:
                if item.next_try_at is None or item.next_try_at <= self.now():
                    self.advance(item)
                    self.beat()  # a round of slow steps must not look like a dead performer
            room = self.settings.ups_max_in_flight - len(items)
            if room > 0 and self._poll_due():
                self.take_new(room)
            with self.sessions() as session:
                still_open = bool(open_workitems(session, self.ae_title))
            if self.ups.contact is not None:  # no request this round: what was known stands
                self._task_manager_error = self.ups.contact or None
            self.beat()
        except SQLAlchemyError as exc:
            # The catalog restarting is an outage to wait out; the journal holds every step.
            logger.error("catalog unavailable, the performer waits: %s", type(exc).__name__)
            return False
        return still_open

    def _until_next_poll(self) -> float:
        """Idle, the loop sleeps until the next search is due: one every poll interval, not
        one an interval after the last busy round."""
        if self._polled_at is None:
            return 0.0
        due = self._polled_at + self.settings.ups_poll_interval_s
        return max(BUSY_TICK_S, due - time.monotonic())

    def _poll_due(self) -> bool:
        """The Task Manager is asked every ups_poll_interval_s, however often the loop turns
        while workitems wait on their analysis."""
        now = time.monotonic()
        if (
            self._polled_at is not None
            and now - self._polled_at < self.settings.ups_poll_interval_s
        ):
            return False
        self._polled_at = now
        return True

    def beat(self, *, started: bool = False) -> None:
        """The heartbeat row: every few seconds, and at once when reachability changes."""
        now, error = self.now(), self._task_manager_error
        recent = self._last_heartbeat and now - self._last_heartbeat < timedelta(
            seconds=HEARTBEAT_EVERY_S
        )
        if recent and not started and error == self._reported_error:
            return
        if error != self._reported_error:
            if error is None:
                logger.info("Task Manager answers again")
            else:
                logger.warning("Task Manager not reachable: %s", error)
        with self.sessions() as session:
            heartbeat(
                session,
                self.ae_title,
                host=socket.gethostname(),
                pid=os.getpid(),
                task_manager=_without_credentials(self.ups.base_url),
                error=error,
                started=started,
            )
        self._last_heartbeat, self._reported_error = now, error

    def take_new(self, room: int) -> None:
        try:
            found = self.ups.scheduled(self.codes, limit=room)
        except UpsError:
            return  # the heartbeat reports it
        uids = {str(ds.SOPInstanceUID): ds for ds in found if ds.get("SOPInstanceUID")}
        with self.sessions() as session:
            known = journaled(session, self.ae_title, uids)
        for uid, ds in uids.items():
            code = task_code(ds)
            if uid in known or code not in self.codes:
                continue  # ours already, or not a task of ours: left alone
            if not UID(uid).is_valid:
                logger.warning("a workitem with an invalid SOP Instance UID is left alone")
                continue
            with self.sessions() as session:
                item = journal_claim(session, uid, self.ae_title, generate_uid(), code)
            if item is None:
                continue
            self.advance(item)
            room -= 1
            if room == 0:
                return

    def advance(self, item: JournaledWorkitem) -> None:
        step = {
            CLAIMING: self._claim,
            CLAIMED: self._take_inputs,
            QUEUED: self._await_analysis,
            ANALYSED: self._store_outputs,
            STORED: self._complete,
            CANCELLING: self._cancel,
        }[item.step]
        try:
            step(item)
        except (UpsError, Retry, Cancel) as exc:
            # A step may have moved on before it failed: the outcome goes to where it is now.
            self._failed(self._reload(item), exc)
        except SQLAlchemyError:
            raise  # the round waits the catalog out
        except Exception as exc:
            # Not foreseen: logged with its traceback and tried again later like an outage
            # (given up with the reason after ups_give_up_after_s), never a crash loop.
            logger.exception("workitem %s (%s): unexpected error", item.workitem_uid, item.step)
            self._failed(self._reload(item), Retry(f"unexpected {type(exc).__name__}"))

    def _failed(self, item: JournaledWorkitem, exc: UpsError | Retry | Cancel) -> None:
        if isinstance(exc, UpsError):
            if exc.retryable:
                self._retry_later(item, str(exc))
            else:
                self._refused(item, exc)
        elif isinstance(exc, Retry):
            self._retry_later(item, str(exc), may_give_up=item.step in (CLAIMED, QUEUED, ANALYSED))
        else:
            self._to_cancel(item, str(exc))

    # --- the steps ---------------------------------------------------------------------------

    def _claim(self, item: JournaledWorkitem) -> None:
        claim = Claim(item.workitem_uid, item.transaction_uid)
        try:
            self.ups.claim(item.workitem_uid, item.transaction_uid)
        except ClaimTaken:
            if not self._still_ours(claim):
                logger.info("workitem %s: claimed by another performer", item.workitem_uid)
                self._set(item, step=TAKEN, reason="claimed by another performer first")
                return
        self._set(item, step=CLAIMED, claimed_at=self.now())
        logger.info("workitem %s claimed (%s)", item.workitem_uid, item.task_code)
        self._progress(claim, 0, f"claimed by {self.ae_title}")
        self._take_inputs(self._reload(item))

    def _still_ours(self, claim: Claim) -> bool:
        """After a 409 on a claim: whether the claim in force is ours (sent before a crash
        that came before its answer was journaled): only its Transaction UID may update."""
        try:
            self.ups.progress(claim, 0, f"claimed by {self.ae_title}")
        except UpsError as exc:
            if exc.retryable:
                raise
            return False
        return True

    def _take_inputs(self, item: JournaledWorkitem) -> None:
        workitem = self.ups.get(item.workitem_uid)
        state = str(workitem.get("ProcedureStepState", ""))
        if state in (UPS_COMPLETED, UPS_CANCELED):
            self._set(item, step=GONE, reason=f"{state} at the Task Manager meanwhile")
            return
        try:
            inputs = inputs_of(workitem)
        except ValueError as exc:
            raise Cancel(str(exc)) from exc
        output = inputs.output_url or self._configured_output()
        if output is None:
            raise Cancel(
                "the workitem names no Output Destination (0040,4070) with a STOW-RS Storage "
                "URL, and this performer has no ups_output_destination"
            )
        parts = self._retrieve(inputs.retrieve_urls)
        try:
            taken = self.intake.take_in(
                parts,
                inputs.study_uid,
                urlsplit(inputs.retrieve_urls[0]).hostname,
                wanted=inputs.sop_instance_uids,
            )
        except InputRefused as exc:
            raise Cancel(str(exc)) from exc
        except OutOfResources as exc:
            raise Retry(f"no room for the inputs: {exc}") from exc
        priority = PRIORITIES.get(str(workitem.get("ScheduledProcedureStepPriority", "")))
        completed = self.intake.complete(inputs.study_uid, priority)
        task_id = None
        if completed is None:
            # Nothing new: the study as analysed (or being analysed) for these images stands.
            with self.sessions() as session:
                progress = study_progress(session, inputs.study_uid)
            assert progress is not None  # take_in cataloged it
            generation = progress.generation
        else:
            generation, chosen = completed
            task_id = self._send_analysis(inputs.study_uid, generation, chosen)
        self._set(
            item,
            step=QUEUED,
            study_instance_uid=inputs.study_uid,
            generation=generation,
            task_id=task_id,
            output_url=output,
            queued_at=self.now(),
        )
        inputs_count = taken.stored + taken.duplicates
        self._progress(self._claim_of(item), 25, f"{inputs_count} inputs retrieved; analysing")

    def _retrieve(self, urls: tuple[str, ...]) -> list[bytes]:
        parts: list[bytes] = []
        for url in urls:
            try:
                parts += retrieve_instances(self.web, url)
            except ValueError as exc:
                raise Cancel(f"Retrieve URL {_without_credentials(url)}: {exc}") from exc
            except WebError as exc:
                if exc.retryable:
                    raise Retry(f"WADO-RS retrieve of the inputs: {exc}") from exc
                raise Cancel(f"WADO-RS retrieve of the inputs failed: {exc}") from exc
        if not parts:
            raise Cancel("WADO-RS returned no instance for the workitem's inputs")
        return parts

    def _send_analysis(self, study_uid: str, generation: int, priority: str) -> str:
        try:
            return self.analyses.analyse(study_uid, generation, priority)
        except (SQLAlchemyError, PacsclipError):
            raise
        except Exception as exc:  # kombu raises its own, the transport's and OSError
            raise Retry(f"the task queue did not take the analysis: {exc}") from exc

    def _await_analysis(self, item: JournaledWorkitem) -> None:
        assert item.study_instance_uid is not None and item.generation is not None
        with self.sessions() as session:
            found = live_results(session, item.study_instance_uid, item.generation)
            progress = study_progress(session, item.study_instance_uid)
        if found is not None:
            analysis_id, objects = found
            self._set(item, step=ANALYSED, analysis_id=analysis_id)
            self._progress(self._claim_of(item), 70, f"analysed: {len(objects)} result objects")
            self._store_outputs(self._reload(item))
            return
        if progress is None:
            raise Cancel("the study left the catalog (purged) before its analysis")
        if progress.state == StudyState.FAILED:
            raise Cancel("the study's analysis failed; see the worker's log")
        if progress.state == StudyState.SHADOW_ONLY:
            raise Cancel(
                "no model is live: the study was scored by shadow models only and no result "
                "was made (make a model live with pacsclip model promote)"
            )
        if progress.generation != item.generation:
            # Late images reopened the study: the results of the newest generation are sent.
            self._set(item, generation=progress.generation, queued_at=self.now())
            return
        failed = self.analyses.failure(item.task_id) if item.task_id else None
        if failed is not None:
            raise Cancel(f"the analysis failed ({failed}); the worker's log says why")
        waited = self.now() - (item.queued_at or self.now())
        if waited > timedelta(seconds=self.settings.requeue_after_s) and progress.state in (
            StudyState.QUEUED,
            StudyState.COMPLETE,
        ):
            logger.warning(
                "study %s generation %d: no analysis after %.0f s, sending it again",
                item.study_instance_uid,
                item.generation,
                waited.total_seconds(),
            )
            with self.sessions() as session:
                repository.force_state(session, item.study_instance_uid, StudyState.COMPLETE)
                session.commit()
            priority = progress.priority or "routine"
            task_id = self._send_analysis(item.study_instance_uid, item.generation, priority)
            self._set(item, task_id=task_id, queued_at=self.now())

    def _store_outputs(self, item: JournaledWorkitem) -> None:
        assert item.study_instance_uid is not None and item.generation is not None
        assert item.output_url is not None
        with self.sessions() as session:
            found = live_results(session, item.study_instance_uid, item.generation)
        if found is None:
            raise Retry("the analysis is recorded but its results are not found")
        _, objects = found
        files = [self.settings.results_dir / o.path for o in objects]
        destination = self._output_destination(item)
        try:
            stow_files(destination, files)
        except DispatchError as exc:
            if exc.retryable:
                raise Retry(str(exc)) from exc
            raise Cancel(f"the results could not be stored: {exc}") from exc
        study = item.study_instance_uid
        outputs = [
            [study, o.series_instance_uid, _sop_class_of(path), o.sop_instance_uid]
            for o, path in zip(objects, files, strict=True)
        ]
        self._set(item, step=STORED, outputs=outputs)
        self._mark_delivered(item.study_instance_uid, item.generation)
        self._progress(self._claim_of(item), 90, f"{len(files)} result objects stored")
        self._complete(self._reload(item))

    def _complete(self, item: JournaledWorkitem) -> None:
        assert item.output_url is not None
        workitem = self.ups.get(item.workitem_uid)
        started = item.claimed_at or self.now()
        performed = performed_procedure(
            workitem,
            [(o[0], o[1], o[2], o[3]) for o in item.outputs or []],
            started=started,
            ended=self.now(),
            station_ae=self.ae_title,
            retrieve_root=_stow_root(item.output_url),
        )
        self.ups.complete(self._claim_of(item), performed)
        self._set(item, step=COMPLETED, reason=None)
        logger.info("workitem %s completed: %d outputs", item.workitem_uid, len(item.outputs or []))

    def _cancel(self, item: JournaledWorkitem) -> None:
        reason = item.reason or "cancelled by pacsclip"
        self.ups.cancel(self._claim_of(item), reason)
        self._set(item, step=CANCELED)
        logger.warning("workitem %s cancelled: %s", item.workitem_uid, reason)

    # --- outcomes ----------------------------------------------------------------------------

    def _to_cancel(self, item: JournaledWorkitem, reason: str) -> None:
        self._set(item, step=CANCELLING, reason=reason[:1024])
        self.advance(self._reload(item))

    def _refused(self, item: JournaledWorkitem, exc: UpsError) -> None:
        """The Task Manager refused a request (400, 404, 409): the workitem was finished,
        cancelled or taken over meanwhile, or it refuses what we sent."""
        try:
            workitem = self.ups.get(item.workitem_uid)
        except UpsError as again:
            if again.retryable:
                self._retry_later(item, str(again))
                return
            self._set(item, step=GONE, reason=f"the Task Manager no longer has it ({again})")
            return
        state = str(workitem.get("ProcedureStepState", ""))
        if item.step == CLAIMING:
            if state not in (UPS_COMPLETED, UPS_CANCELED) and self._still_ours(
                self._claim_of(item)
            ):
                # Our claim of before a crash, refused when sent again with other than 409.
                self._set(item, step=CLAIMED, claimed_at=self.now())
            else:
                # Never ours: nothing to cancel (the claim itself was refused).
                self._set(item, step=GONE, reason=f"the claim was refused: {exc}")
        elif state == UPS_COMPLETED and item.step == STORED:
            self._set(item, step=COMPLETED, reason=None)  # our completion, sent before a crash
        elif state == UPS_CANCELED and item.step == CANCELLING:
            self._set(item, step=CANCELED)
        elif state in (UPS_COMPLETED, UPS_CANCELED):
            self._set(item, step=GONE, reason=f"{state} at the Task Manager meanwhile")
        elif item.step == CANCELLING:
            self._set(item, step=GONE, reason=f"{item.reason}; the cancel was refused: {exc}")
        else:
            self._to_cancel(item, f"the Task Manager refused a request: {exc}")

    def _retry_later(
        self, item: JournaledWorkitem, reason: str, *, may_give_up: bool = False
    ) -> None:
        limit = timedelta(seconds=self.settings.ups_give_up_after_s)
        claimed = item.claimed_at
        if may_give_up and claimed is not None and self.now() - claimed > limit:
            self._to_cancel(item, f"gave up after {limit.total_seconds():g} s: {reason}")
            return
        delay = min(BACKOFF_FIRST_S * 2**item.attempts, BACKOFF_MAX_S)
        logger.warning(
            "workitem %s (%s): %s; again in %.0f s", item.workitem_uid, item.step, reason, delay
        )
        self._set(
            item,
            attempts=item.attempts + 1,
            next_try_at=self.now() + timedelta(seconds=delay),
            reason=reason[:1024],
        )

    # --- helpers -----------------------------------------------------------------------------

    def _progress(self, claim: Claim, percent: float, description: str) -> None:
        """Progress is news, not a step: a failure to report it is logged and forgotten."""
        try:
            self.ups.progress(claim, percent, description)
        except UpsError as exc:
            logger.info("progress of workitem %s not reported: %s", claim.workitem_uid, exc)

    def _set(self, item: JournaledWorkitem, **values: object) -> None:
        with self.sessions() as session:
            set_workitem(session, item.id, **values)

    def _reload(self, item: JournaledWorkitem) -> JournaledWorkitem:
        with self.sessions() as session:
            return workitem(session, item.id)

    def _claim_of(self, item: JournaledWorkitem) -> Claim:
        return Claim(item.workitem_uid, item.transaction_uid)

    def _configured(self) -> DestinationConfig | None:
        named = self.settings.ups_output_destination
        return next((d for d in self.settings.destinations if d.name == named), None)

    def _configured_output(self) -> str | None:
        configured = self._configured()
        return configured.url if configured else None

    def _output_destination(self, item: JournaledWorkitem) -> StowDestination:
        """The workitem's Storage URL with the Task Manager's credentials, or the configured
        destination with its own."""
        assert item.output_url is not None
        configured = self._configured()
        if configured is not None and configured.url == item.output_url:
            return stow_destination(configured)
        token = self.settings.ups_bearer_token
        return StowDestination(
            name=f"Output Destination of workitem {item.workitem_uid}",
            url=_stow_root(item.output_url),
            bearer_token=token.get_secret_value() if token else None,
            tls_ca=self.settings.ups_tls_ca,
            client_cert=self.settings.ups_tls_cert,
            client_key=self.settings.ups_tls_key,
        )

    def _mark_delivered(self, study_uid: str, generation: int) -> None:
        with self.sessions() as session:
            progress = study_progress(session, study_uid)
            if progress and progress.generation == generation and progress.state == "analysed":
                repository.set_state(session, study_uid, StudyState.DELIVERED)
                session.commit()


def _stow_root(storage_url: str) -> str:
    """The DICOMweb root of a STOW-RS Storage URL (".../studies" or ".../studies/{uid}")."""
    root = storage_url.rstrip("/")
    head, _, tail = root.rpartition("/studies")
    if head and (tail == "" or tail.lstrip("/").count("/") == 0):
        return head
    return root


def _sop_class_of(path: Path) -> str:
    return str(read_file_meta_info(path).MediaStorageSOPClassUID)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def build_performer(settings: Settings) -> Performer:
    """The performer of ``settings``: its catalog, one HTTP session for UPS-RS, WADO-RS and
    STOW-RS, the routing rules and the workers' task queue; PacsclipError says what is
    missing or already running."""
    from dicom_node.celery_publisher import CeleryPublisher
    from dicom_node.routing import default_rules, load_rules
    from plugin.catalog.db import open_catalog
    from plugin.dicomweb import http_session
    from plugin.task_queue import make_celery

    if settings.ups_url is None:
        raise PacsclipError(
            "no Task Manager: set ups_url (PACSCLIP_UPS_URL) to its UPS-RS root, the URL "
            "whose /workitems lists the scheduled workitems"
        )
    catalog = open_catalog(settings.effective_database_url)
    check_alone(settings, catalog)
    token = settings.ups_bearer_token
    session = http_session(
        WebAuth(
            bearer_token=token.get_secret_value() if token else None,
            tls_ca=settings.ups_tls_ca,
            client_cert=settings.ups_tls_cert,
            client_key=settings.ups_tls_key,
        )
    )
    rules = load_rules(settings.rules_file) if settings.rules_file else default_rules()
    publisher = CeleryPublisher(make_celery(settings), catalog.sessions)
    publisher.connect()
    return Performer(
        settings,
        catalog,
        UpsClient(settings.ups_url, session),
        session,
        WorkitemIntake(settings, catalog, rules),
        publisher,
    )


def main(settings: Settings) -> None:
    """Run the performer until SIGINT or SIGTERM."""
    performer = build_performer(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: the performer stops after this step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    performer.run(stop)


@contextmanager
def performer_thread(performer: Performer) -> Iterator[None]:
    """``pacsclip serve`` with ups_url: the performer in a thread for the time of the block
    (a step under way is finished, then it stops)."""
    stop = threading.Event()
    thread = threading.Thread(target=performer.run, args=(stop,), name="task-performer")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def check_alone(settings: Settings, catalog: Catalog) -> None:
    """Refuse to start beside a live performer of the same AE title: two would work the same
    journal rows. One whose process is gone (killed, crashed) is taken over."""
    from plugin.catalog.ups_workitems import performer_statuses

    with catalog.sessions() as session:
        rows = [
            s for s in performer_statuses(session) if s.performer == settings.performer_ae_title
        ]
    if not rows:
        return
    row = rows[0]
    age = (datetime.now(UTC) - row.heartbeat_at).total_seconds()
    if row.pid == os.getpid():
        return
    if row.host == socket.gethostname():
        if not _alive(row.pid):
            return  # killed or crashed: its workitems are taken over
    elif age >= max(3 * settings.ups_poll_interval_s, 3 * HEARTBEAT_EVERY_S):
        return  # another host's, silent for longer than its rounds take
    raise PacsclipError(
        f"task performer {row.performer} is running on {row.host} (pid {row.pid}, heartbeat "
        f"{age:.0f} s ago): give this one its own ups_ae_title"
    )


def _alive(pid: int) -> bool:
    """Whether a pacsclip process runs under ``pid`` (on Linux a PID reused by another
    program, after a reboot say, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"pacsclip" in cmdline.read_bytes()
    except OSError:
        return True  # no /proc: the PID alone says it
